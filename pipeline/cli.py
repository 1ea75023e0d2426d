"""`onalign run CONFIG [key=value ...]`, `onalign report RUN_DIR [...]`, `onalign build-model`."""

from __future__ import annotations

import argparse
import sys

from common.errors import causes, is_user_error, one_line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="onalign", description="Online iterative preference alignment on Ray + vLLM + DeepSpeed"
    )
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the configured number of alignment iterations")
    run.add_argument("config", help="YAML config (see configs/)")
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. iterations=4 algorithm.name=ipo")
    run.add_argument("--resume", action="store_true", help="continue from the last complete iteration in output_dir")
    run.add_argument("--dry-run", action="store_true", help="validate and print the resource plan; start nothing")
    run.add_argument("--quiet", action="store_true", help="plain log lines: no progress display")
    run.add_argument(
        "--verbose",
        action="store_true",
        help="stream the actors' own output (vLLM, DeepSpeed) to the console instead of OUTPUT_DIR/logs/",
    )
    rep = sub.add_parser("report", help="rebuild the report of one run, or compare several")
    rep.add_argument("runs", nargs="+", help="run directories")
    rep.add_argument("--out", help="where to write (default: the run dir; required for several runs)")
    build = sub.add_parser("build-model", help="build (or find cached) the tiny offline policy and print its path")
    build.add_argument("overrides", nargs="*")
    return p


def _stop_on_sigterm() -> None:
    """`ray job stop` sends SIGTERM: unwind normally so actors are released and files are closed."""
    import signal

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; `run`'s key=value overrides may come before or after its flags (argparse alone takes
    a positional after a flag as an unrecognized argument)."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    overrides = [a for a in extra if "=" in a and not a.startswith("-")]
    unknown = [a for a in extra if a not in overrides]
    if unknown or (overrides and args.command != "run"):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.command == "run":
        _stop_on_sigterm()
    try:
        return _dispatch(args)
    except Exception as e:  # user mistakes get one line, no traceback; an actor's failure one line and its log
        log = getattr(e, "onalign_log", None)
        if is_user_error(e):
            print(f"onalign: error: {e}", file=sys.stderr)
            if log:
                print(f"onalign: details in {log}", file=sys.stderr)
            return 2
        if any(type(c).__name__ == "GetTimeoutError" for c in causes(e)):  # a wait at start-up, outside the loop
            print(
                "onalign: error: the actors did not answer within call_timeout_s (Ray's GetTimeoutError); starting "
                "vLLM and DeepSpeed can take minutes on a busy or first-time machine: raise call_timeout_s",
                file=sys.stderr,
            )
            if log:
                print(f"onalign: details in {log}", file=sys.stderr)
            return 2
        if log:
            print(f"onalign: error: {one_line(e)}", file=sys.stderr)
            print(f"onalign: details in {log}", file=sys.stderr)
            return 1
        raise


def _dispatch(args) -> int:
    from common.config_files import load_config

    if args.command == "report":
        from pipeline.compare import write_comparison
        from pipeline.report import write_report

        if len(args.runs) == 1:
            print(write_report(args.runs[0], args.out))
        else:
            print(write_comparison(args.runs, args.out or "comparison"))
        return 0
    if args.command == "build-model":
        from pipeline.console import quiet_libraries
        from pipeline.model_source import resolve_model

        quiet_libraries()

        print(resolve_model(load_config(None, args.overrides)))
        return 0
    overrides = list(args.overrides)
    if args.resume:
        overrides.append("resume=true")
    if args.quiet:
        overrides.append("quiet=true")
    if args.verbose:
        overrides.append("verbose=true")
    cfg = load_config(args.config, overrides)
    if not cfg.verbose:
        from pipeline.console import quiet_libraries

        quiet_libraries()
    if args.dry_run:
        import os

        import ray

        from pipeline.placement import cluster_nodes, dry_run
        from pipeline.preflight import check_run

        prep = check_run(cfg)  # every check a run makes before its actors start; writes nothing
        resume = f", resuming after iteration {prep.rundir.resume_from}" if prep.rundir.resume_from else ""
        print(
            f"checked: model {prep.model_path}; {len(prep.train)} train / {len(prep.eval)} eval prompts; "
            f"reward {cfg.reward.kind}; output_dir {prep.rundir.where}{resume}"
        )
        if ray.is_initialized() or os.environ.get("RAY_ADDRESS"):
            if not ray.is_initialized():
                from pipeline.driver import init_ray

                init_ray(cfg)  # join the cluster a run would use (starts nothing)
            nodes = cluster_nodes()
        else:  # this machine, as the local Ray a run starts would see it, without starting one
            import torch

            nodes = [{"CPU": float(cfg.ray_num_cpus or os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}]
        params = None
        if cfg.placement == "colocate" and cfg.train.num_gpus > 0:  # the memory split needs the model's size
            from pipeline.placement import parameter_count

            params = parameter_count(prep.model_path, cfg.model.trust_remote_code)
        print(dry_run(cfg, nodes, params))
        return 0
    from pipeline.driver import run

    rows = run(cfg)
    last = rows[-1] if rows else {}
    from pipeline.tables import cell

    print(
        f"[onalign] done: {last.get('iteration', 0)} iterations, final eval_reward_mean="
        f"{cell(last.get('eval_reward_mean'), '{:.3f}')}; report: {cfg.output_dir}/report.html"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
