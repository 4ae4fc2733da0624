"""Command line: ``issl-fast demo`` (the main job), ``issl-fast info`` (build report) and
``issl-fast bench`` (this build's kernels against pure PyTorch, on this machine)."""

from __future__ import annotations

import argparse
import json
import sys


def _info(args: argparse.Namespace) -> int:
    from . import build_info

    info = build_info()
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    width = max(len(k) for k in info)
    for key in sorted(info):
        print(f"{key:<{width}}  {info[key]}")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _device(text: str) -> str:
    """A torch device this machine has (checked before minutes of work, not during them)."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError as exc:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: this torch has no CUDA device "
                                         "(torch.cuda.is_available() is False)")
    if device.type == "cuda" and device.index is not None \
            and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(
            f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: the demo runs on cpu or cuda")
    return text


def _out_dir(text: str) -> str:
    """A report directory the demo can write (checked before minutes of work, not after them)."""
    from .demo import DemoOutputError, check_output

    try:
        check_output(text)
    except DemoOutputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _bench(args: argparse.Namespace) -> int:
    from .benchmark import format_table, run

    result = run(rounds=args.rounds, quick=args.quick, threads=args.threads)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, DemoOutputError, run_demo

    cfg = DemoConfig(out=args.out, ssl=args.ssl, seed=args.seed,
                     views=args.views, solver=args.solver, progress=not args.no_progress,
                     device=args.device)
    if args.quick:
        cfg.epochs, cfg.n_train, cfg.n_exact, cfg.n_near, cfg.n_outliers = 8, 400, 10, 10, 12
        cfg.n_boot = 100
    if args.epochs is not None:  # (an explicit --epochs wins over --quick's)
        cfg.epochs = args.epochs
    try:
        summary = run_demo(cfg)
    except DemoOutputError as exc:  # (the parser checked --out: this is a change since then)
        args.parser.error(str(exc))
    q = summary["quality"]
    di, db = q["duplicates_influence"], q["duplicates_baseline"]
    oi, ob = q["outliers_influence"], q["outliers_baseline"]
    print("\n== issl_fast demo: detection quality vs the planted truth ==")
    print(f"{'':40}{'Influence-SSL':>15}{'baseline kNN':>15}")
    rows = [
        (f"duplicates recall @ {cfg.dup_threshold}", di["recall"], db["recall"]),
        (f"duplicates precision @ {cfg.dup_threshold}", di["precision"], db["precision"]),
        ("duplicates recall @ precision>=0.9", di.get("recall_at_precision_0.9", 0.0),
         db.get("recall_at_precision_0.9", 0.0)),
        ("  ... aligned matching only", q["duplicates_influence_aligned"].get(
            "recall_at_precision_0.9", 0.0), q["duplicates_baseline_aligned"].get(
            "recall_at_precision_0.9", 0.0)),
        ("outliers AUROC (influence kNN)", oi["auroc"], ob["auroc"]),
        (f"outliers precision@{oi['k']} (influence kNN)", oi["precision_at_k"],
         ob["precision_at_k"]),
        ("outliers AUROC (self-influence)", q["outliers_self_influence"]["auroc"], ob["auroc"]),
    ]
    for name, a, b in rows:
        print(f"{name:40}{a:>15.3f}{b:>15.3f}")
    t = summary["timings_s"]
    print("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()))
    print(f"report: {cfg.out}/report.md")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="issl-fast", description="Label-free influence (Influence-SSL) for SSL encoders."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="print build info: version, CUDA, SIMD level, threads")
    p_info.add_argument("--json", action="store_true", help="machine-readable output")
    p_info.set_defaults(func=_info)
    p_bench = sub.add_parser("bench", help="time this build's CPU kernels against pure "
                             "PyTorch and this machine's limits (about 20 s on 2 idle CPU "
                             "cores, 40 s on busy ones)")
    p_bench.add_argument("--rounds", type=_positive_int, default=5,
                         help="timed rounds per case (median)")
    p_bench.add_argument("--threads", type=_positive_int, default=None,
                         help="threads for the kernels and the baselines (default: torch's)")
    p_bench.add_argument("--quick", action="store_true", help="small sizes (5-12 s on 2 CPU cores)")
    p_bench.add_argument("--json", action="store_true", help="machine-readable output")
    p_bench.set_defaults(func=_bench)
    # (durations: measured on 2 CPU cores, the low end with them otherwise idle, the high end
    # with other jobs sharing them; training is what slows down)
    p_demo = sub.add_parser("demo", help="find planted duplicates/outliers in digits and write "
                            "a report (1.5-5 minutes on 2 CPU cores; --quick: 30-75 s)")
    p_demo.add_argument("--out", default="issl_demo", type=_out_dir,
                        help="report directory (default issl_demo); a store an earlier demo run "
                        "left in OUT/store is replaced, anything else there is refused")
    p_demo.add_argument("--ssl", default="simclr", choices=["simclr", "byol", "barlow"],
                        help="SSL method used to train the encoder")
    p_demo.add_argument("--epochs", type=_positive_int, default=None,
                        help="SSL training epochs (default 40; 8 with --quick)")
    p_demo.add_argument("--views", type=_positive_int, default=8,
                        help="augmented views per example")
    p_demo.add_argument("--solver", default="ekfac",
                        choices=["ekfac", "block", "gauss_newton", "identity"])
    p_demo.add_argument("--seed", type=int, default=0)
    p_demo.add_argument("--quick", action="store_true",
                        help="reduced setting: 400 digits + 32 planted, 8 epochs (30-75 s on 2 "
                        "CPU cores, against 1.5-5 minutes)")
    p_demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    p_demo.add_argument("--device", default="cpu", type=_device,
                        help="where to train and run the engine: cpu (default), cuda, cuda:1...")
    p_demo.set_defaults(func=_demo, parser=p_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
