"""`lab run SPEC`: parse the run options and call lab.runner.run_experiment."""

from __future__ import annotations

import argparse
import sys

from lab.cli.common import add_spec_args, expand_from_args, select_variants
from lab.errors import LabError
from lab.launch import LAUNCHERS


def cmd_run(args: argparse.Namespace) -> int:
    from lab.runner import run_experiment, with_teachers
    from lab.spec import baseline_key

    sets = list(args.set or [])
    if args.devices is not None:
        sets.append(f"train.devices={args.devices}")
    if args.num_nodes is not None:
        sets.append(f"train.num_nodes={args.num_nodes}")
    if args.strategy is not None:
        sets.append(f"train.strategy={args.strategy}")
    args.set = sets
    spec, variants = expand_from_args(args)
    options = launch_options(args, spec.launch)
    launcher = args.launcher or spec.launch.launcher
    chosen = variants
    if args.variant:
        chosen = with_teachers(select_variants(variants, args.variant, args.spec), variants)
    results = run_experiment(
        spec,
        chosen,
        force=args.force,
        progress=not args.no_progress and sys.stderr.isatty(),
        baseline=baseline_key(spec, variants),
        launcher=launcher,
        launch_options=options,
    )
    return 0 if all(r.ok for r in results) else 1


def launch_options(args: argparse.Namespace, launch=None):
    """The spec's `launch:` section, with every --ray-*/--slurm-* flag given on the command line on top."""
    from lab.launch import LaunchOptions
    from lab.spec import LaunchSpec

    launch = launch or LaunchSpec()
    ray, sl = launch.ray, launch.slurm
    params = dict(sl.params)
    for a in args.slurm_param or []:
        if "=" not in a:
            raise LabError(f"--slurm-param expects KEY=VALUE, got {a!r}")
        k, val = a.split("=", 1)
        params[k.strip().lstrip("-").replace("-", "_")] = val

    def pick(flag: str, spec_value):
        given = getattr(args, flag, None)
        return spec_value if given is None else given

    return LaunchOptions(
        ray_address=pick("ray_address", ray.address),
        ray_num_cpus=pick("ray_num_cpus", ray.num_cpus),
        slurm_cluster=pick("slurm_cluster", sl.cluster),
        slurm_folder=pick("slurm_folder", sl.folder),
        slurm_partition=pick("slurm_partition", sl.partition),
        slurm_account=pick("slurm_account", sl.account),
        slurm_qos=pick("slurm_qos", sl.qos),
        slurm_constraint=pick("slurm_constraint", sl.constraint),
        slurm_mem_gb=pick("slurm_mem_gb", sl.mem_gb),
        slurm_cpus_per_task=pick("slurm_cpus_per_task", sl.cpus_per_task),
        slurm_gpus_per_node=pick("slurm_gpus_per_node", sl.gpus_per_node),
        slurm_setup=list(sl.setup) + list(args.slurm_setup or []),
        slurm_params=params,
        slurm_time=pick("slurm_time", sl.time),
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="train every variant of a spec under its budget and record it in MLflow")
    p.add_argument("spec")
    add_spec_args(p)
    p.add_argument("--force", action="store_true", help="retrain variants that already have a FINISHED run")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="KEY",
        help="train only this variant (repeatable; teachers it needs are added)",
    )
    p.add_argument(
        "--launcher",
        choices=LAUNCHERS,
        default=None,
        help="default: the spec's launch.launcher, else local. local: variants one after the other; ray: one Ray task per variant "
        "($RAY_ADDRESS or a local instance); slurm: one sbatch job per variant (submitit)",
    )
    p.add_argument("--devices", help="override train.devices (int or auto)")
    p.add_argument("--num-nodes", type=int, help="override train.num_nodes")
    p.add_argument("--strategy", help="override train.strategy (e.g. ddp)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("ray launcher")
    g.add_argument("--ray-address", help="Ray cluster address (default: $RAY_ADDRESS, else a local instance)")
    g.add_argument("--ray-num-cpus", type=float, help="CPUs per variant task (default: devices x threads on CPU)")
    g = p.add_argument_group("slurm launcher (submitit)")
    g.add_argument("--slurm-partition", help="sbatch --partition")
    g.add_argument("--slurm-time", type=int, metavar="MINUTES", help="sbatch --time in minutes (default 240)")
    g.add_argument("--slurm-account", help="sbatch --account")
    g.add_argument("--slurm-qos", help="sbatch --qos")
    g.add_argument("--slurm-constraint", help="sbatch --constraint")
    g.add_argument("--slurm-mem-gb", type=float, help="memory per node in GB")
    g.add_argument("--slurm-cpus-per-task", type=int, help="CPUs per task (default: train.threads)")
    g.add_argument(
        "--slurm-gpus-per-node", type=int, help="GPUs per node (default: train.devices when train.accelerator is gpu)"
    )
    g.add_argument(
        "--slurm-setup",
        action="append",
        default=[],
        metavar="LINE",
        help="shell line run in the job before training (repeatable), e.g. 'module load cuda'",
    )
    g.add_argument(
        "--slurm-param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other sbatch parameter (repeatable), e.g. --slurm-param mail_type=END",
    )
    g.add_argument("--slurm-folder", help="submitit folder for job logs (default <store>/submitit/<experiment>/%%j)")
    g.add_argument(
        "--slurm-cluster",
        choices=["slurm", "local"],
        default=None,
        help="local: run the jobs on this machine with submitit's LocalExecutor (testing)",
    )
    p.set_defaults(func=cmd_run)
