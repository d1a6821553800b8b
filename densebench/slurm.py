"""Submit the run_all.sh paper steps as SLURM jobs with submitit (`pip install densebench[slurm]`).

Each job runs one task per GPU; every task sets the torchrun environment variables
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) from SLURM and calls the same
`densebench` subcommand that torchrun would run. Pre-training (unless --checkpoint is
given), evaluation and the report are chained with afterok dependencies.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional


class DensebenchTask:
    """A picklable callable that runs `densebench ARGS` as one rank of a distributed job."""

    def __init__(self, argv: List[str]):
        self.argv = argv

    def __call__(self) -> int:
        import submitit

        from densebench.cli import main

        env = submitit.JobEnvironment()
        os.environ.update({
            "RANK": str(env.global_rank), "WORLD_SIZE": str(env.num_tasks), "LOCAL_RANK": str(env.local_rank),
            "MASTER_ADDR": env.hostnames[0], "MASTER_PORT": os.environ.get("MASTER_PORT", "29500"),
        })
        return main(self.argv)


def executor(folder: Path, args, gpus: int, nodes: int, name: str):
    import submitit

    ex = submitit.AutoExecutor(folder=str(folder / "%j"))
    params = dict(name=name, nodes=nodes, gpus_per_node=gpus, tasks_per_node=gpus,
                  cpus_per_task=10, timeout_min=args.timeout_min)
    if args.partition:
        params["slurm_partition"] = args.partition
    ex.update_parameters(**params)
    return ex


def main(argv: Optional[List[str]] = None) -> int:
    from densebench.cli import OneLineParser, bounded_int, seed_list

    parser = OneLineParser(prog="python -m densebench.slurm", description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--out", default="results")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--name", default=None)
    parser.add_argument("--gpus", type=bounded_int(1), default=8)
    parser.add_argument("--nodes", type=bounded_int(1), default=1)
    parser.add_argument("--partition", default=None)
    parser.add_argument("--timeout-min", type=bounded_int(1), default=4320)
    # checked here, not after the job is queued
    parser.add_argument("--seeds", type=seed_list, default=[0], help="evaluation seeds, comma-separated (one record each)")
    args = parser.parse_args(argv)
    try:
        import submitit  # noqa: F401
    except ImportError:
        parser.error("--slurm needs submitit: pip install 'densebench[slurm]'")
    out = Path(args.out)
    logs = out / "slurm"
    dependency = None
    checkpoint = args.checkpoint
    if checkpoint is None:
        work = out / "pretrain" / "densecl_paper"
        pre = executor(logs, args, args.gpus, args.nodes, "densebench-pretrain")
        resume = ["--resume"] if (work / "latest").is_file() else []
        job = pre.submit(DensebenchTask(["pretrain", "--data", str(Path(args.data_root) / "imagenet"),
                                         "--work-dir", str(work), "--preset", "paper", *resume]))
        print(f"submitted pre-training: job {job.job_id}")
        dependency = job.job_id
        checkpoint = str(work / "backbone.pth")          # written by the trainer at the end
    ev = executor(logs, args, args.gpus, args.nodes, "densebench-evaluate")
    if dependency:
        ev.update_parameters(slurm_additional_parameters={"dependency": f"afterok:{dependency}"})
    job = ev.submit(DensebenchTask(["evaluate", checkpoint, "--data-root", args.data_root, "--preset", "paper",
                                    "--out", str(out), "--seeds", ",".join(map(str, args.seeds)),
                                    "--name", args.name or Path(checkpoint).stem]))
    print(f"submitted evaluation: job {job.job_id}")
    rep = executor(logs, args, 0, 1, "densebench-report")
    rep.update_parameters(slurm_additional_parameters={"dependency": f"afterok:{job.job_id}"}, tasks_per_node=1)
    report_job = rep.submit(DensebenchTask(["report", str(out)]))
    print(f"submitted report: job {report_job.job_id}; results in {out}/report.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
