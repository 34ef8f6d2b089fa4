"""The ``fleetrl`` command line."""

from __future__ import annotations

import argparse
import os
import sys

OVERRIDES_HELP = "dotted overrides applied after the file, e.g. learner.lr=1e-6 rollout.num_workers=4"


def _cmd_train(args: argparse.Namespace) -> int:
    from fleetrl.run.config import ConfigError, load_config
    from fleetrl.train import train

    if args.resume:
        from fleetrl.run.runtime import resume_config

        given = ([args.config] if args.config else []) + args.overrides
        if any("=" not in text for text in given):
            raise ConfigError(f"train --resume {args.resume}: the run's saved config.yaml is used; give only "
                              f"key=value overrides after it (got {[t for t in given if '=' not in t]})")
        cfg, config_path = resume_config(args.resume, given), None
    elif not args.config:
        raise ConfigError("train needs a CONFIG file, or --resume RUN_DIR")
    else:
        cfg, config_path = load_config(args.config, args.overrides), args.config
    if args.verbose:
        from fleetrl.core.console import VERBOSE_ENV_VAR

        os.environ[VERBOSE_ENV_VAR] = "1"
    run_dir = train(cfg, config_path=config_path)
    print(f"fleetrl: run finished; outputs in {run_dir}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from fleetrl.run.check import check_config

    report = check_config(args.config, args.overrides, cluster=not args.no_cluster)
    print(f"fleetrl: {args.config}: ready to train\n{report.summary()}")
    return 0


def _cmd_config_show(args: argparse.Namespace) -> int:
    from fleetrl.run.config import dump_config, load_config

    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0


def _cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from fleetrl.testing.tiny import build_tiny_model

    path = build_tiny_model(args.out_dir, seed=args.seed, reward_model=args.reward_model)
    kind = "reward model (sequence classification)" if args.reward_model else "causal LM"
    print(f"fleetrl: wrote a tiny {kind} with its tokenizer to {path}")
    return 0


def _cmd_scale(args: argparse.Namespace) -> int:
    from fleetrl.online.control import scale_run

    status = scale_run(args.run, args.rollout_workers, args.address, args.namespace, wait_s=args.wait)
    done = status.get("rollout_workers") == args.rollout_workers
    print(f"fleetrl: run {args.run}: {status.get('rollout_workers')} rollout worker(s) "
          f"(asked {args.rollout_workers}{'' if done else ', not applied yet'}), step {status.get('step')}")
    return 0 if done else 1


def _cmd_plot(args: argparse.Namespace) -> int:
    from fleetrl.metrics.plot import plot_runs

    out = args.out or os.path.join(args.run_dirs[0], "plots")
    written, notes = plot_runs(args.run_dirs, out, smooth_window=args.smooth)
    for note in notes:
        print(f"fleetrl: note: {note}")
    for f in written:
        print(f"fleetrl: wrote {f}")
    return 0 if written else 1


def _cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fleetrl.learner.lora import export_merged

    out = export_merged(Path(args.run_dir) / "final_model", args.merged)
    print(f"fleetrl: wrote the base model with the run's LoRA adapter merged in to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fleetrl",
        description="Post-train language models with RL and preference optimization on a Ray cluster: "
        "a vLLM generation fleet, a reward service and a DeepSpeed learner, driven by one config file.",
        epilog="Start with: fleetrl train examples/grpo_tiny.yaml (runs on a laptop CPU).",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    t = sub.add_parser(
        "train",
        help="run the algorithm named in CONFIG",
        description="Run training as the config's `algorithm` says. Writes a run directory "
        "(run.output_dir/run.name) with config.yaml (resolved), metrics.jsonl (one JSON object per "
        "step, always with `step`), checkpoints/ and the final model as a Hugging Face directory.",
    )
    t.add_argument("config", nargs="?", help="YAML run config (see examples/); not with --resume")
    t.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    t.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue the run in RUN_DIR (a local path or s3:// URI) from its last complete "
                   "checkpoint, with its saved config.yaml plus any overrides (secrets it shows as "
                   "<redacted> must be given again; ${env:NAME} references need nothing back)")
    t.add_argument("--verbose", action="store_true",
                   help="show the libraries' own output on the console too (progress bars, start-up warnings); "
                   "same as run.verbose=true. train.log always has everything the console had")
    t.set_defaults(func=_cmd_train)

    ck = sub.add_parser(
        "check",
        help="check a config's inputs without starting anything",
        description="Run the checks `fleetrl train` starts with, and nothing else: the config, the model and "
        "tokenizer, every data row, the reward functions against the data's columns, the output location and, "
        "when joining a cluster (ray.address / RAY_ADDRESS), its resources. Exit 0 when ready, 2 with one line "
        "per problem otherwise.",
    )
    ck.add_argument("config", help="YAML run config")
    ck.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    ck.add_argument("--no-cluster", action="store_true", help="skip the cluster resource check")
    ck.set_defaults(func=_cmd_check)

    c = sub.add_parser("config", help="inspect configs", description="Inspect configs.")
    csub = c.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)
    cs = csub.add_parser(
        "show",
        help="print the resolved config (file + overrides + defaults)",
        description="Validate CONFIG with its overrides and print the full resolved config as YAML, "
        "every default included.",
    )
    cs.add_argument("config", help="YAML run config")
    cs.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    cs.set_defaults(func=_cmd_config_show)

    m = sub.add_parser(
        "make-tiny-model",
        help="write a tiny random-init model + locally trained tokenizer",
        description="Write a tiny Qwen2-style causal LM (random init, deterministic by --seed) with a "
        "tokenizer trained locally and a chat template. Loads in transformers, vLLM (CPU too) and "
        "DeepSpeed. Configs may also say model.path: tiny to build and cache it automatically.",
    )
    m.add_argument("out_dir", help="directory to write (created)")
    m.add_argument("--seed", type=int, default=0, help="initialization seed (default 0)")
    m.add_argument(
        "--reward-model", action="store_true", help="write a sequence-classification reward model instead"
    )
    m.set_defaults(func=_cmd_make_tiny_model)

    sc = sub.add_parser(
        "scale",
        help="grow or shrink a running job's rollout fleet",
        description="Ask a running job for N rollout workers. The job applies it between steps: removed "
        "workers finish their generate calls first (no prompt is lost), new workers load the current "
        "weights before they take prompts. Waits until the job reports the new size.",
    )
    sc.add_argument("run", help="the run's name (the last part of its run directory)")
    sc.add_argument("--rollout-workers", type=int, required=True, metavar="N", help="wanted number of workers")
    sc.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS)")
    sc.add_argument("--namespace", default="fleetrl", help="Ray namespace of the run (ray.namespace; default fleetrl)")
    sc.add_argument("--wait", type=float, default=600.0, metavar="S", help="seconds to wait for it (default 600)")
    sc.set_defaults(func=_cmd_scale)

    pl = sub.add_parser(
        "plot",
        help="PNGs of reward, KL, length, loss, eval and step time from run directories",
        description="Read each RUN_DIR's metrics.jsonl and write one PNG per figure (reward, kl, length, "
        "loss, eval, step_time_curve, step_time), several runs overlaid with a legend. Keys a run does "
        "not have are skipped with a note.",
    )
    pl.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (run.output_dir/<run name>)")
    pl.add_argument("--out", default=None, metavar="DIR", help="where to write the PNGs (default: RUN_DIR/plots "
                    "of the first run)")
    pl.add_argument("--smooth", type=int, default=0, metavar="N", help="trailing mean over N steps (default: none)")
    pl.set_defaults(func=_cmd_plot)


    ex = sub.add_parser(
        "export",
        help="merge a LoRA run's adapter into its base model",
        description="A run with learner.lora writes final_model/ as a PEFT adapter naming its base model. "
        "This merges the adapter into the base weights and writes a plain Hugging Face model (loadable by "
        "transformers and vLLM) to OUT.",
    )
    ex.add_argument("run_dir", help="the run directory (holds final_model/)")
    ex.add_argument("--merged", required=True, metavar="OUT", help="directory to write the merged model to")
    ex.set_defaults(func=_cmd_export)

    from fleetrl.deploy.cli import add_deploy_commands  # submit, status, logs, stop, jobs (Ray Jobs API)

    add_deploy_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from fleetrl.run.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"fleetrl: {e}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError, FileExistsError, FileNotFoundError) as e:
        # Data, reward and service errors carry their own what-to-change message.
        if os.environ.get("FLEETRL_TRACEBACK"):
            raise
        print(f"fleetrl: error: {type(e).__name__}: {e}\n(set FLEETRL_TRACEBACK=1 for the traceback)",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fleetrl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
