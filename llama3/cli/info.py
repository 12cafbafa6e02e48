"""`llama3 info`: the presets and their sizes, or a model folder's configuration."""

from __future__ import annotations

import argparse

HELP = "show the model presets: shapes, parameter counts and context lengths"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llama3 info", description=HELP)
    parser.add_argument("--preset", help="show one preset's full configuration")
    args = parser.parse_args(argv)

    from ..config import PRESETS, preset

    if args.preset:
        cfg = preset(args.preset)
        for key, value in cfg.to_dict().items():
            print(f"{key:<26} {value}")
        print(f"{'hidden_dim (FFN)':<26} {cfg.hidden_dim}")
        print(f"{'parameters':<26} {cfg.num_params():,}")
        return 0
    print(f"{'preset':<15} {'params':>10} {'dim':>6} {'layers':>6} {'heads':>5} {'kv':>3} {'ffn':>6} {'context':>8}")
    for name in PRESETS:
        cfg = preset(name)
        n = cfg.num_params()
        size = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
        print(f"{name:<15} {size:>10} {cfg.dim:>6} {cfg.n_layers:>6} {cfg.n_heads:>5} {cfg.n_kv_heads:>3} "
              f"{cfg.hidden_dim:>6} {cfg.max_seq_len:>8}")
    return 0
