"""`llama3 pretrain`: train a Llama 3 from scratch on a folder written by `llama3 prepare`."""

from __future__ import annotations

import argparse
import copy
import sys

HELP = "pretrain from scratch on prepared token shards (recipes, --section.key=value overrides, --resume)"


def build_parser() -> argparse.ArgumentParser:
    from ..train.recipes import recipe_names

    parser = argparse.ArgumentParser(
        prog="llama3 pretrain", description=HELP,
        epilog="Any config field can be set as --section.key=value, e.g. --train.steps=50 --optim.lr=1e-3 "
               "--model.n_layers=4 (sections: model, data, optim, schedule, train, checkpoint, parallel, "
               "logging). --print-config shows them all.")
    parser.add_argument("--recipe", choices=recipe_names(), help="starting config (default: debug)")
    parser.add_argument("--data", help="dataset folder from `llama3 prepare` (sets data.path)")
    parser.add_argument("--out", help="run folder for checkpoints, metrics.jsonl and the HF export "
                                      "(sets train.out_dir)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest complete checkpoint in --out, with the config saved in "
                             "it; flags given now change it (each change is reported)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    return parser


def _apply_flags(cfg, args: argparse.Namespace, overrides: list[str]):
    from ..train.config import apply_overrides

    if args.data:
        cfg.data.path = args.data
    if args.out:
        cfg.train.out_dir = args.out
    return apply_overrides(cfg, overrides)


def resolve_config(args: argparse.Namespace, overrides: list[str], *, notice=None):
    """The TrainConfig for parsed arguments: recipe, then --data/--out, then --section.key overrides.

    With --resume and a checkpoint in the run folder, the run's saved config takes the recipe's place, and
    `notice` (default: print to stderr) gets one line per field the flags change."""
    from ..train.recipes import recipe
    from ..train.resume import config_changes, saved_run_config

    cfg = _apply_flags(recipe(args.recipe or "debug"), args, overrides)
    saved = saved_run_config(cfg.train.out_dir) if args.resume else None
    if saved is None:
        return cfg
    if args.recipe and saved.recipe and args.recipe != saved.recipe:
        raise ValueError(f"--recipe {args.recipe}: the run in {cfg.train.out_dir} was started from recipe "
                         f"{saved.recipe!r} and resumes with its saved config; drop --recipe and change single "
                         "fields with --section.key=value")
    resumed = _apply_flags(copy.deepcopy(saved), args, overrides)
    resumed.train.out_dir = cfg.train.out_dir  # where the checkpoint was found
    notice = notice or (lambda line: print(line, file=sys.stderr))
    for key, old, value in config_changes(saved, resumed):
        if key != "train.out_dir":
            notice(f"llama3 pretrain: resuming with {key}={value!r} (the run was saved with {old!r})")
    return resumed


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = resolve_config(args, overrides)
    except ValueError as e:
        parser.error(str(e))
    if args.print_config:
        print(cfg.to_json(), end="")
        return 0
    if not cfg.data.path:
        parser.error("no dataset: pass --data DIR (a folder written by `llama3 prepare`)")
    from ..train.pretrain import pretrain

    try:
        pretrain(cfg, resume=args.resume)
    except ValueError as e:
        print(f"llama3 pretrain: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # WriteFailed from the loop, or another write (a full disk): one line, no traceback
        print(f"llama3 pretrain: error: {e}", file=sys.stderr)
        return 1
    return 0
