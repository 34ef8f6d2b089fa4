"""``fleetrl submit | status | logs | stop | jobs``: fleetrl runs as Ray jobs on a cluster.

``add_deploy_commands(subparsers)`` adds the commands to the ``fleetrl`` parser; each sets
``func`` to a function taking the parsed args and returning the exit status. Imports of Ray stay
inside those functions, so ``fleetrl --help`` stays fast. ``python -m fleetrl.deploy.cli`` runs the same
commands on their own.
"""

from __future__ import annotations

import argparse
import sys

ADDRESS_HELP = (
    "the head's dashboard address, e.g. http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS or RAY_ADDRESS)"
)
AUTH_EPILOG = (
    "Token authentication (Ray 2.60): if the head was started with a token (RAY_AUTH_MODE=token, or a "
    "~/.ray/auth_token on the head), export RAY_AUTH_MODE=token here and make the token available in "
    "~/.ray/auth_token, RAY_AUTH_TOKEN or the file RAY_AUTH_TOKEN_PATH (print it on the head with "
    "`ray get-auth-token`)."
)
EXIT_EPILOG = "Exit status: 0 done, 1 the job FAILED or was STOPPED, 2 the request could not be made."


def _fail(err: Exception) -> int:
    print(f"fleetrl: {err}", file=sys.stderr)
    return 2


def _job_exit(status: str) -> int:
    return 1 if status in ("FAILED", "STOPPED") else 0


def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    import datetime as dt

    return dt.datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M:%S")


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _quiet_ray() -> None:
    """Ray's job SDK logs every ignore file it reads, each upload and each closed log stream at
    INFO, and warns that .git/.venv are excluded (fleetrl excludes them itself). Its modules set
    their loggers' levels on import, so import them first."""
    import importlib
    import logging

    importlib.import_module("ray.dashboard.modules.dashboard_sdk")
    importlib.import_module("ray.dashboard.modules.job.sdk")
    for name, level in (("ray._private.runtime_env.packaging", logging.WARNING),
                        ("ray._private.runtime_env.working_dir", logging.ERROR),
                        ("ray.dashboard.modules.dashboard_sdk", logging.WARNING),
                        ("ray.dashboard.modules.job.sdk", logging.WARNING)):
        logging.getLogger(name).setLevel(level)


def _short(message: str) -> str:
    """Ray appends the job's last logs to a failed job's message; they were just shown."""
    return message.split(", last available logs", 1)[0].strip()


def cmd_submit(args: argparse.Namespace) -> int:
    from fleetrl.deploy import jobs

    _quiet_ray()
    job_id = None
    try:
        env_vars = jobs.parse_env_pairs(args.env or [])
        pip = args.pip or None
        if pip and len(pip) == 1 and pip[0].endswith(".txt"):
            pip = pip[0]  # a requirements file
        job_id = jobs.submit(
            args.config, args.overrides, address=args.address, working_dir=args.working_dir, pip=pip,
            env_vars=env_vars, job_id=args.job_id, validate=not args.no_validate, launcher=args.launcher,
        )
        print(f"fleetrl: submitted job {job_id}", flush=True)
        if not args.wait:
            print(f"fleetrl: follow it with `fleetrl logs {job_id} --follow`; "
                  f"`fleetrl status {job_id}`, `fleetrl stop {job_id}`", flush=True)
            return 0
        state = jobs.wait_for(job_id, address=args.address, timeout_s=args.timeout, follow=True)
    except jobs.DeployError as e:
        return _fail(e)
    except KeyboardInterrupt:
        if job_id:
            print(f"\nfleetrl: stopped following; job {job_id} keeps running on the cluster "
                  f"(`fleetrl stop {job_id}` ends it)", file=sys.stderr)
        return 130
    print(f"fleetrl: job {job_id} {state.status}" + (f": {_short(state.message)}" if state.message else ""))
    return _job_exit(state.status)


def cmd_status(args: argparse.Namespace) -> int:
    from fleetrl.deploy import jobs

    try:
        state = jobs.status(args.job_id, address=args.address)
    except jobs.DeployError as e:
        return _fail(e)
    print(f"job:        {state.job_id}")
    print(f"status:     {state.status}")
    if state.message:
        print(f"message:    {_short(state.message)}")
    print(f"entrypoint: {state.entrypoint}")
    print(f"started:    {_fmt_time(state.start_time)}")
    print(f"ended:      {_fmt_time(state.end_time)}")
    print(f"duration:   {_fmt_duration(state.duration_s)}")
    if state.driver_exit_code is not None:
        print(f"exit code:  {state.driver_exit_code}")
    return _job_exit(state.status)


def cmd_logs(args: argparse.Namespace) -> int:
    from fleetrl.deploy import jobs

    try:
        if args.follow:
            _quiet_ray()
            jobs.logs(args.job_id, address=args.address, follow=True, out=sys.stdout)
            return _job_exit(jobs.status(args.job_id, address=args.address).status)
        sys.stdout.write(jobs.logs(args.job_id, address=args.address))
        sys.stdout.flush()
        return 0
    except jobs.DeployError as e:
        return _fail(e)
    except KeyboardInterrupt:
        print("\nfleetrl: stopped following; the job keeps running", file=sys.stderr)
        return 130


def cmd_graceful_stop(args: argparse.Namespace) -> int:
    """Write the run directory's STOP file; the run finishes its step, checkpoints, writes its final
    model and exits 0. --wait: until it has (the run removes the file)."""
    import time

    from fleetrl.core.storage import Storage
    from fleetrl.run.runtime import request_graceful_stop

    try:
        where = request_graceful_stop(args.job_id)
    except (FileNotFoundError, RuntimeError, OSError) as e:
        return _fail(e)
    print(f"fleetrl: asked the run in {args.job_id} to stop after its current step, with a checkpoint "
          f"({where})", flush=True)
    if not args.wait:
        return 0
    timeout = 900.0 if args.timeout is None else args.timeout
    deadline, store = time.monotonic() + timeout, Storage()
    while store.exists(where):
        if time.monotonic() > deadline:
            print(f"fleetrl: the run has not stopped within {timeout:.0f}s (is it running? it looks for {where} "
                  "between steps)", file=sys.stderr)
            return 1
        time.sleep(2.0)
    print(f"fleetrl: the run in {args.job_id} stopped with a checkpoint")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from fleetrl.deploy import jobs

    if args.graceful:
        return cmd_graceful_stop(args)
    if args.timeout is None:
        args.timeout = 60.0

    try:
        was_running = jobs.stop(args.job_id, address=args.address)
        if not was_running:
            state = jobs.status(args.job_id, address=args.address)
            print(f"fleetrl: job {args.job_id} had already ended ({state.status})")
            return 0
        if args.wait:
            state = jobs.wait_for(args.job_id, address=args.address, timeout_s=args.timeout)
            print(f"fleetrl: job {args.job_id} {state.status}")
        else:
            print(f"fleetrl: asked job {args.job_id} to stop (its driver gets SIGTERM, then SIGKILL)")
        return 0
    except jobs.DeployError as e:
        return _fail(e)


def cmd_jobs(args: argparse.Namespace) -> int:
    from fleetrl.deploy import jobs

    try:
        states = jobs.list_jobs(address=args.address)
    except jobs.DeployError as e:
        return _fail(e)
    if not states:
        print("fleetrl: no jobs on this cluster")
        return 0
    rows = [("JOB", "STATUS", "STARTED", "DURATION", "ENTRYPOINT")]
    rows += [(s.job_id, s.status, _fmt_time(s.start_time), _fmt_duration(s.duration_s), s.entrypoint)
             for s in states]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
    return 0


def _address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None, metavar="URL", help=ADDRESS_HELP)


def add_deploy_commands(sub) -> None:
    """Add submit, status, logs, stop and jobs to an argparse subparsers object."""
    s = sub.add_parser(
        "submit",
        help="run `fleetrl train CONFIG` as a Ray job on a cluster",
        description="Validate CONFIG here, upload the working directory (minus .git, .venv, runs/, caches "
        "and what .gitignore/.rayignore name) and start `fleetrl train CONFIG [overrides]` as a Ray job "
        "on the cluster; its driver runs on the head node and starts the rollout fleet, reward scorers and "
        "learner as Ray actors. Prints the job id.",
        epilog=AUTH_EPILOG + " " + EXIT_EPILOG,
    )
    s.add_argument("config", help="YAML run config, inside the working dir (its path on the cluster is the same "
                   "relative to it)")
    s.add_argument("overrides", nargs="*", help="dotted overrides applied after the file, e.g. rollout.num_workers=8")
    _address(s)
    s.add_argument("--working-dir", default=None, metavar="DIR",
                   help="directory uploaded as the job's current directory (default: the current directory)")
    s.add_argument("--pip", action="append", metavar="REQ",
                   help="pip requirement to install for the job (repeatable), or one requirements .txt file; "
                   "default none: the cluster's image is expected to have fleetrl's dependencies")
    s.add_argument("--env", action="append", metavar="KEY[=VALUE]",
                   help="environment variable for the job's driver and actors (repeatable); a bare KEY copies "
                   "this shell's value, e.g. --env WANDB_API_KEY")
    s.add_argument("--job-id", default=None, help="submission id (default: fleetrl-<config>-<UTC time>-<hex>)")
    s.add_argument("--launcher", choices=("fleetrl", "python"), default="fleetrl",
                   help="start the job with the `fleetrl` command (default; fleetrl installed on the cluster) or "
                   "with `python -m fleetrl.cli` (only fleetrl's dependencies installed there); either way "
                   "the uploaded code is what runs")
    s.add_argument("--no-validate", action="store_true",
                   help="skip loading the config here (e.g. when its files exist only on the cluster)")
    s.add_argument("--wait", action="store_true",
                   help="stream the job's logs until it ends; the exit status is the job's")
    s.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="with --wait, give up waiting after this long (the job keeps running)")
    s.set_defaults(func=cmd_submit)

    st = sub.add_parser(
        "status", help="show a job's status",
        description="Show a Ray job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED), its message, "
        "entrypoint and timing.",
        epilog=EXIT_EPILOG,
    )
    st.add_argument("job_id", metavar="JOB_ID", help="the id `fleetrl submit` printed (or see `fleetrl jobs`)")
    _address(st)
    st.set_defaults(func=cmd_status)

    lg = sub.add_parser(
        "logs", help="print a job's output",
        description="Print the output of a Ray job's driver (the fleetrl progress lines, warnings and errors); "
        "actor output is in the Ray dashboard's logs view.",
        epilog=EXIT_EPILOG,
    )
    lg.add_argument("job_id", metavar="JOB_ID", help="the job id")
    lg.add_argument("-f", "--follow", action="store_true",
                    help="keep streaming until the job ends (Ctrl-C stops following, not the job)")
    _address(lg)
    lg.set_defaults(func=cmd_logs)

    sp = sub.add_parser(
        "stop", help="stop a running job (--graceful: a run, after its step, with a checkpoint)",
        description="Stop a Ray job: its driver gets SIGTERM, then SIGKILL a few seconds later "
        "(RAY_JOB_STOP_WAIT_TIME_S); the actors it started go with it. With --graceful, give the run's "
        "directory instead (output_dir/name: a local or shared path, or an s3:// URI): the run finishes "
        "its current step, writes a checkpoint and its final model, and exits 0 (`fleetrl train --resume "
        "RUN_DIR` continues it). A local run also stops this way on SIGTERM (kill PID).",
    )
    sp.add_argument("job_id", metavar="JOB_ID|RUN_DIR", help="the job id; with --graceful, the run directory")
    sp.add_argument("--graceful", action="store_true",
                    help="ask the run in RUN_DIR to finish its step, checkpoint and exit (writes RUN_DIR/STOP)")
    sp.add_argument("--wait", action="store_true", help="wait until the job (or run) has stopped")
    sp.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                    help="with --wait, how long to wait (default 60; 900 with --graceful)")
    _address(sp)
    sp.set_defaults(func=cmd_stop)

    jb = sub.add_parser(
        "jobs", help="list the cluster's jobs",
        description="List every Ray job the cluster knows (fleetrl's and others), oldest first.",
    )
    _address(jb)
    jb.set_defaults(func=cmd_jobs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fleetrl", description="fleetrl runs as Ray jobs on a cluster.",
                                epilog=AUTH_EPILOG)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_deploy_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
