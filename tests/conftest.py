import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TIMM_FUSED_ATTN", "0")  # removes one source of float differences vs timm

import pytest  # noqa: E402
import torch  # noqa: E402

from mnv4.models.specs import ModelSpec, cn, fib, mqa, uib  # noqa: E402


@pytest.fixture
def tiny_hybrid_spec() -> ModelSpec:
    """A few-thousand-parameter MNv4-style net with every block type, for fast tests."""
    return ModelSpec(
        name="tiny_hybrid",
        stem=cn(3, 2, 8),
        stages=(
            (fib(3, 2, 16),),
            (uib(3, 5, 2, 16, 2.0), uib(0, 3, 1, 16, 2.0)),
            (uib(3, 3, 2, 24, 2.0), mqa(2, 8, kv_stride=2), uib(0, 0, 1, 24, 2.0)),
            (uib(5, 0, 2, 32, 2.0), mqa(2, 8), uib(3, 0, 1, 32, 2.0)),
        ),
        layer_scale_init=1e-5,
        num_features=64,
        head_hidden_size=96,
    )


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give BN statistics, affine parameters and layer scales non-trivial values, so that weight
    loading errors change the output (default init leaves them at 0/1 and 1e-5)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("gamma" in name or name.endswith("weight")):
                p.copy_(torch.rand(p.shape, generator=g) * 0.4 + 0.3)
            elif p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.05)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) * 0.5 + 0.75)
    return model


def require(module: str, reason: str | None = None):
    """``pytest.importorskip(module)``, except that with ``MNV4_REQUIRE_RUNTIMES=1`` in the environment
    (CI, where every runtime is installed) a missing module fails the test instead of skipping it,
    so a broken install cannot turn the runtime tests into silent skips."""
    if os.environ.get("MNV4_REQUIRE_RUNTIMES", "") not in ("", "0"):
        import importlib

        try:
            return importlib.import_module(module)
        except ImportError as e:
            pytest.fail(f"MNV4_REQUIRE_RUNTIMES is set but {module} cannot be imported: {e}", pytrace=False)
    return pytest.importorskip(module, reason=reason)
