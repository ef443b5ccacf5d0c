"""``mnv4 hub push``: share a run or checkpoint on the Hugging Face Hub."""

from __future__ import annotations

import argparse

from . import args as A

__all__ = ["register"]


def _cmd_push(args: argparse.Namespace) -> int:
    from ..hub.push import push_to_hub

    where = push_to_hub(
        args.source,
        args.repo_id,
        private=args.private,
        local_dir=args.local_dir,
        license=args.license,
        dataset=args.dataset,
    )
    if args.local_dir is not None:
        print(f"wrote the repository for {args.repo_id} to {where} (nothing uploaded)")
        print(f"load it with mnv4.create_model(checkpoint={str(where)!r}); upload by rerunning without --local-dir")
    else:
        print(f"pushed to {where}; load it with mnv4.create_model('hf-hub:{args.repo_id}')")
    return 0


def register(sub) -> None:
    group = sub.add_group("hub", help="share models on the Hugging Face Hub (load them with hf-hub:OWNER/NAME)")
    p = group.add_parser(
        "push",
        help="upload a training run or checkpoint: config.json, model.safetensors and a model card",
        description=(
            "Writes the Hub's layout (config.json with architecture, labels and preprocessing as timm writes it, "
            "model.safetensors in timm's key layout where timm has the architecture, a README.md model card with "
            "the run's metrics, recipe, data, licence and reproducing command) and uploads it. Needs "
            "`pip install 'mnv4[hub]'` and `hf auth login` (or HF_TOKEN) unless --local-dir is given."
        ),
    )
    p.add_argument("source", metavar="RUN_OR_CHECKPOINT", help="an `mnv4 train` run folder, or a checkpoint file")
    p.add_argument("--repo-id", required=True, metavar="OWNER/NAME", help="the Hub repository (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument(
        "--local-dir", default=None, metavar="DIR", help="write the repository folder here instead of uploading it"
    )
    A.declare_outputs(p, local_dir="folder")
    p.add_argument("--license", default="apache-2.0", help="Hub licence id for the card and config.json")
    p.add_argument("--dataset", default=None, metavar="HUB_DATASET_ID", help="training data's Hub id for the card")
    p.set_defaults(func=_cmd_push)
