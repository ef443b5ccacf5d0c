"""Object detection on MobileNetV4 backbones (docs/detection.md): data, augmentation, metrics, training."""
