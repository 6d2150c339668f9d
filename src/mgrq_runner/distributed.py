"""Distributed evaluation from inside one job: spawned workers on torch.distributed, scores identical to evaluate().

``evaluate_distributed`` spawns ``world_size`` processes (no ``torchrun`` needed), gives each one a contiguous run
of whole evaluation batches, runs ``evaluate.evaluate`` on it, gathers the per-model counts and predictions on
rank 0 with ``torch.distributed`` and combines them. Shards follow the single-process batch boundaries, so every
image is seen exactly once, in the same batch as in ``evaluate(create_loader(dataset, batch_size))``, and top-1,
top-5, agreement, the image count and the predictions (in data set order) are the same.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import Dataset, Subset

from mgrq_runner.console import track
from mgrq_runner.data import create_loader
from mgrq_runner.errors import ConfigError, MgrqError
from mgrq_runner.scoring import EvalResult, evaluate
from mgrq_runner.settings import JobSettings

log = logging.getLogger(__name__)

BACKENDS = ("gloo", "nccl")
ShardScores = dict[str, dict[str, Any]]  # model name -> correct1, correct5, num_images, seconds, predictions


class DistributedEvalError(RuntimeError):
    """A worker of a distributed evaluation failed; the message names the rank and carries its traceback."""


def free_port() -> int:
    """A TCP port on localhost that is free now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def shard_ranges(num_images: int, batch_size: int, world_size: int) -> list[range]:
    """Splits ``range(num_images)`` into ``world_size`` contiguous shards of whole batches.

    Batch boundaries are those of one unshuffled loader over all images, so each shard's loader yields exactly
    the batches the single-process loader yields. Shards differ by at most one batch; all are non-empty when
    ``world_size`` is at most the number of batches.
    """
    num_batches = -(-num_images // batch_size)
    bounds = [min(num_images, (rank * num_batches // world_size) * batch_size) for rank in range(world_size + 1)]
    return [range(bounds[rank], bounds[rank + 1]) for rank in range(world_size)]


def shard_scores(results: dict[str, EvalResult]) -> ShardScores:
    """The integer counts, forward time and predictions behind one shard's ``evaluate`` results."""
    return {
        name: {
            "correct1": round(r.top1 * r.num_images / 100.0),
            "correct5": round(r.top5 * r.num_images / 100.0),
            "num_images": r.num_images,
            "seconds": r.num_images / r.images_per_second,
            "predictions": r.predictions,
        }
        for name, r in results.items()
    }


def combine_shards(shards: list[ShardScores], reference: str) -> dict[str, EvalResult]:
    """Scores of the whole data set from its shards' scores (in shard order), as ``evaluate`` computes them.

    Throughput is the aggregate forward rate: all images over the slowest rank's forward time.
    """
    total = sum(s[reference]["num_images"] for s in shards)
    preds = {name: torch.cat([s[name]["predictions"] for s in shards]) for name in shards[0]}
    results = {}
    for name in shards[0]:
        seconds = max(s[name]["seconds"] for s in shards)
        results[name] = EvalResult(
            top1=100.0 * sum(s[name]["correct1"] for s in shards) / total,
            top5=100.0 * sum(s[name]["correct5"] for s in shards) / total,
            agreement=float((preds[name] == preds[reference]).float().mean()),
            num_images=total,
            images_per_second=total / max(seconds, 1e-9),
            predictions=preds[name],
        )
    return results


def evaluate_distributed(
    models: dict[str, nn.Module],
    dataset: Dataset,
    batch_size: int,
    world_size: int,
    backend: str = "gloo",
    reference: str | None = None,
    workers: int = 0,
) -> dict[str, EvalResult]:
    """Evaluates ``models`` on ``dataset`` with ``world_size`` spawned processes; same scores as ``evaluate``.

    Args:
        models: models to evaluate, by name (any device; each rank loads a copy to its own device).
        dataset: the evaluation set; it and the models must be picklable.
        batch_size: evaluation batch size (the shards are made of whole batches of this size).
        world_size: number of processes; lowered to the number of batches when there are fewer.
        backend: ``gloo`` (ranks on the CPU, the CPU threads split among them) or ``nccl`` (rank r on ``cuda:r``).
        reference: the model the others' ``agreement`` is measured against (defaults to the first model).
        workers: DataLoader worker processes per rank.

    Raises:
        ConfigError: bad ``world_size``, ``batch_size`` or ``backend``, or fewer GPUs than ranks for ``nccl``.
        MgrqError: the error a worker raised (for example ``NumericalError``), its message prefixed by the rank.
        DistributedEvalError: any other worker failure, with the worker's traceback.
    """
    reference = reference or next(iter(models))
    if reference not in models:
        raise ConfigError(f"reference model {reference!r} is not among the models {list(models)}.")
    if backend not in BACKENDS:
        raise ConfigError(f"distributed evaluation backend {backend!r} is unknown. Fix: gloo (CPU) or nccl (GPUs).")
    if world_size < 1 or batch_size < 1:
        raise ConfigError(f"world_size={world_size} and batch_size={batch_size} must be positive.")
    num_images = len(dataset)  # type: ignore[arg-type]
    if num_images == 0:
        raise ValueError("evaluation got no images")
    num_batches = -(-num_images // batch_size)
    if world_size > num_batches:
        log.warning("%d images make %d batches: evaluating on %d ranks", num_images, num_batches, num_batches)
        world_size = num_batches
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise ConfigError(
            f"nccl evaluation on {world_size} ranks needs {world_size} GPUs, {torch.cuda.device_count()} are "
            "visible. Fix: lower the world size or use backend gloo."
        )
    threads = max(1, torch.get_num_threads() // world_size)
    workdir = Path(tempfile.mkdtemp(prefix="mgrq-dist-"))
    try:
        try:
            torch.save({"models": models, "dataset": dataset}, workdir / "payload.pt")
        except (pickle.PicklingError, AttributeError, TypeError) as err:
            raise ConfigError(
                f"distributed evaluation sends the models and the data set to its workers, but they cannot be "
                f"pickled ({err}). Fix: use module-level classes and transforms (no lambdas), or world_size 1."
            ) from err
        start = time.perf_counter()
        _spawn(world_size, (world_size, backend, free_port(), str(workdir), batch_size, reference, workers, threads))
        wall = time.perf_counter() - start
        shards = torch.load(workdir / "result.pt", weights_only=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results = combine_shards(shards, reference)
    log.info(
        "distributed evaluation: %d images, %d models, %d rank(s) (%s) in %.1f s, %.1f images/s aggregate",
        num_images,
        len(models),
        world_size,
        backend,
        wall,
        num_images / wall,
    )
    return results


def _spawn(world_size: int, args: tuple) -> None:
    """Runs ``_worker`` on ``world_size`` spawned processes; a worker's failure is raised here, clearly."""
    context = mp.start_processes(_worker, args=args, nprocs=world_size, join=False, start_method="spawn")
    try:
        while not context.join():
            pass
    except mp.ProcessRaisedException as err:
        raise _worker_error(err.error_index, world_size, Path(args[3]), err.msg) from None
    except mp.ProcessExitedException as err:
        raise DistributedEvalError(
            f"distributed evaluation: rank {err.error_index} of {world_size} (pid {err.pid}) died with exit "
            f"code {err.exit_code}{f' ({err.signal_name})' if err.signal_name else ''}, without a Python error "
            "(out of memory? killed?)."
        ) from None
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
        for process in context.processes:
            process.join()


def _worker_error(rank: int, world_size: int, workdir: Path, worker_traceback: str) -> Exception:
    """The exception to raise in the parent for a worker that raised: the worker's own MgrqError (so the CLI
    prints its one-line fix), else a DistributedEvalError holding the worker's traceback."""
    try:
        original = pickle.loads((workdir / f"error{rank}.pkl").read_bytes())
    except Exception:  # no file, or an exception that cannot be rebuilt: fall back to the traceback text
        original = None
    if isinstance(original, MgrqError):  # its message already names the rank
        return original
    text = worker_traceback.strip()
    summary = text.splitlines()[-1] if text else "unknown error"
    return DistributedEvalError(
        f"distributed evaluation, rank {rank} of {world_size} failed: {summary}\n\nWorker traceback:\n{text}"
    )


def _worker(
    rank: int,
    world_size: int,
    backend: str,
    port: int,
    workdir: str,
    batch_size: int,
    reference: str,
    workers: int,
    threads: int,
) -> None:
    """One rank: evaluates its shard, gathers every rank's scores on rank 0, which writes them to ``result.pt``."""
    folder = Path(workdir)
    shard: range | None = None
    try:
        if backend == "nccl":
            device = torch.device("cuda", rank)
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
            torch.set_num_threads(threads)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
        # our own temporary file, written by the parent a moment ago: a full pickle is needed for the modules
        payload = torch.load(folder / "payload.pt", map_location="cpu", weights_only=False)
        models = {name: model.to(device).eval() for name, model in payload["models"].items()}
        dataset = payload["dataset"]
        shard = shard_ranges(len(dataset), batch_size, world_size)[rank]
        loader = create_loader(Subset(dataset, shard), batch_size, workers)
        scores = shard_scores(evaluate(models, loader, device, reference=reference))
        gathered: list[Any] | None = [None] * world_size if rank == 0 else None
        dist.gather_object(scores, gathered, dst=0)
        if rank == 0:
            torch.save(gathered, folder / "result.pt")
    except BaseException as err:
        if isinstance(err, MgrqError):  # evaluate() counts images from the shard's start: say where it lies
            images = f", images {shard.start}-{shard.stop - 1}" if shard is not None else ""
            err.args = (f"distributed evaluation, rank {rank} of {world_size}{images}: {err}",)
        with contextlib.suppress(Exception):  # the parent falls back to the traceback text
            (folder / f"error{rank}.pkl").write_bytes(pickle.dumps(err))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def evaluate_models(
    models: dict[str, nn.Module], dataset: Dataset, settings: JobSettings, device: torch.device
) -> dict[str, EvalResult]:
    """Scores ``models`` on ``dataset`` as a job's settings say: in this process, or on ``eval.world_size``
    spawned ranks (the same scores); ``eval.backend=auto`` is nccl on a GPU, else gloo."""
    batch_size, workers, world_size = settings.data.batch_size, settings.data.workers, settings.eval.world_size
    if world_size > 1:
        backend = settings.eval.backend
        backend = ("nccl" if device.type == "cuda" else "gloo") if backend == "auto" else backend
        return evaluate_distributed(models, dataset, batch_size, world_size, backend, next(iter(models)), workers)
    loader = create_loader(dataset, batch_size, workers)
    return evaluate(models, track(loader, len(loader), "evaluate", settings.progress), device)
