"""``camexport run --engine ray``: the batches of a run computed by a pool of Ray actors.

Ray Data's batch-inference pattern: a dataset of index ranges (the batches the local engine
would run, the same ones), ``map_batches`` over a callable class whose ``__init__`` opens the
input, the artifact's onnxruntime sessions and the task once per actor, an actor pool of
``--workers`` actors with ``--cpus-per-worker`` / ``--gpus-per-worker`` each. Every actor reads
its ranges straight from the input file and writes each batch as a shard of the result (the local
store's atomic rename); the driver holds the lock on ``OUT.h5``, keeps its live view, reports one
progress line and finishes the self-contained file. A Ray result is therefore the local one:
same layout, same numbers; the root attribute ``run_engine`` records the engine, the worker count
and Ray's version.

Faults: the shards are the completion mask. An actor that dies is restarted and its task retried
(``max_restarts=-1``, ``max_task_retries=-1``, set explicitly); a range whose shard is already
there is skipped, so a retry writes nothing twice. A killed driver takes its actors with it (they
belong to its job); the same command then resumes from the shards.

Ray is an optional extra (``pip install camexport[ray]``); nothing else in camexport imports it.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from camexport.errors import CamexportError
from camexport.run import Job, LiveView, RunConfig, RunError, RunSummary, _batches, _refuse_inputs
from camexport.runtime import THREADS_VARIABLE
from camexport.store import OutputLock

#: Ray's token authentication: its mode variable and the token file of local clusters
AUTH_MODE = "RAY_AUTH_MODE"
DEFAULT_TOKEN = Path.home() / ".ray" / "auth_token"

#: Ray Data blocks per actor of the pool at most: a block is one task of an actor (~50 ms of
#: Ray's own work each, measured); a retried block recomputes only its ranges with no shard yet
BLOCKS_PER_WORKER = 8
#: ... and at most this many ranges in a block (progress and the live view advance per block)
RANGES_PER_BLOCK = 64


@dataclass
class RayOptions:
    #: None: start a local Ray on this machine (or join the one this process already runs);
    #: "auto" or "ray://HOST:PORT" (or a GCS address HOST:PORT): join that cluster
    address: str | None = None
    #: actors in the pool: N, or "MIN:MAX" for a pool Ray Data grows and shrinks with the load
    workers: int | str = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0

    @property
    def pool(self) -> tuple[int, int]:
        """(min, max) actors, or a RunError saying how to write --workers."""
        text = str(self.workers)
        try:
            low, _, high = text.partition(":")
            pool = (int(low), int(high or low))
        except ValueError:
            pool = (0, 0)
        if not 1 <= pool[0] <= pool[1]:
            raise RunError(f"--workers must be a count of actors (2) or a range MIN:MAX (2:8) with "
                           f"1 <= MIN <= MAX, not {text!r}")
        return pool

    def describe(self) -> str:
        low, high = self.pool
        return f"{low if low == high else f'{low} to {high}'} Ray worker{'s' * (high > 1)}"

    def check(self) -> None:
        self.pool  # noqa: B018 (raises when --workers is malformed)
        if self.cpus_per_worker <= 0:
            raise RunError(f"--cpus-per-worker must be above 0, not {self.cpus_per_worker}")
        if self.gpus_per_worker < 0:
            raise RunError(f"--gpus-per-worker must be 0 or more, not {self.gpus_per_worker}")


def import_ray(address: str | None = None):
    """Ray, or a RunError naming the extra to install. Joining a cluster by ``address`` with
    RAY_AUTH_MODE unset and a token in ~/.ray/auth_token: token mode, as the cluster's own (Ray
    >= 2.59 starts local clusters with token authentication and keeps their token there, but a
    driver that joins by address sends it only in token mode, read when Ray is imported)."""
    if address and AUTH_MODE not in os.environ and DEFAULT_TOKEN.is_file() and "ray" not in sys.modules:
        os.environ[AUTH_MODE] = "token"
    try:
        import ray
        import ray.data
    except ImportError as err:
        raise RunError(f"--engine ray needs Ray ({err}); install it with `pip install camexport[ray]` "
                       f"(or run with --engine local, the default)") from err
    return ray


class ShardWorker:
    """One actor of the pool: a Job of its own (data, sessions, task), writing shards only."""

    def __init__(self, config: dict, threads: int):
        if threads:
            os.environ[THREADS_VARIABLE] = str(threads)  # read by camexport.runtime.session
        self.job = Job(RunConfig(**config), worker=True)

    def __call__(self, batch: dict) -> dict:
        starts, stops, invalid, skipped = [], [], [], []
        for start, stop in zip(batch["start"].tolist(), batch["stop"].tolist()):
            if self.job.writer.shard_path(start, stop).exists():  # a retried range already written
                starts.append(start), stops.append(stop), invalid.append(0), skipped.append(True)
                continue
            arrays = self.job.batch(start, stop)
            self.job.writer.write(start, arrays)
            starts.append(start), stops.append(stop)
            invalid.append(int(arrays["invalid"].sum())), skipped.append(False)
        return {"start": starts, "stop": stops, "invalid": invalid, "skipped": skipped}


@contextmanager
def _connected(ray, options: RayOptions):
    """Ray initialised for the run: a running one kept as it is, else joined or started (and
    shut down at the end when this call started it)."""
    if ray.is_initialized():
        yield
        return
    try:
        ray.init(address=options.address, include_dashboard=False, logging_level=logging.ERROR)
    except ConnectionError as err:
        raise RunError(f"cannot reach the Ray cluster at {options.address} ({err}); start it with "
                       f"`ray start --head` or pass its address to --address. A cluster with token "
                       f"authentication needs {AUTH_MODE}=token and its token (RAY_AUTH_TOKEN or "
                       f"{DEFAULT_TOKEN}) here") from err
    try:
        yield
    finally:
        ray.shutdown()


def _cause(err: BaseException) -> BaseException:
    """The camexport error inside Ray's wrappers, if there is one."""
    seen = err
    while seen is not None:
        if isinstance(seen, CamexportError):
            return seen
        seen = getattr(seen, "cause", None) or seen.__cause__
    return err


def _absolute(config: RunConfig) -> RunConfig:
    """Paths the actors can open whatever their working directory (a shared filesystem on a
    cluster: see docs/scale-out.md)."""
    targets = str(config.targets)
    if targets.startswith("concept:"):
        targets = "concept:" + str(Path(targets.split(":", 1)[1]).resolve())
    return replace(config, artifact=Path(config.artifact).resolve(), data=Path(config.data).resolve(),
                   out=Path(config.out).resolve(), targets=targets if targets != str(config.targets)
                   else config.targets)


def run_ray(config: RunConfig, options: RayOptions, progress=None) -> RunSummary:
    """The whole job on Ray: --out checked and locked on the driver, batches on the actors."""
    options.check()
    ray = import_ray(options.address)
    _refuse_inputs(config)
    config = _absolute(config)
    with OutputLock(config.out, "run"):
        job = Job(config, provenance={"engine": "ray", "workers": str(options.workers),
                                      "cpus_per_worker": options.cpus_per_worker,
                                      "gpus_per_worker": options.gpus_per_worker,
                                      "ray_version": ray.__version__})
        try:
            return _drive(ray, job, options, progress)
        finally:
            job.data.close()


def _drive(ray, job: Job, options: RayOptions, progress) -> RunSummary:
    begin = time.perf_counter()
    writer = job.writer
    done = writer.done()[: job.count]
    if done.all() and writer.complete:
        return RunSummary(Path(job.config.out), job.count, 0, 0, 0.0, job.provider, finished=False)
    ranges = [{"start": start, "stop": stop} for start, stop in _batches(done, job.config.batch_size)]
    todo = int((~done).sum())
    computed = invalid = 0
    if ranges:
        view = LiveView(writer)
        with _connected(ray, options):
            context = ray.data.DataContext.get_current()
            context.enable_progress_bars = False  # one progress line, camexport's
            logging.getLogger("ray.data").setLevel(logging.ERROR)
            with warnings.catch_warnings():
                # restarts and retries set explicitly (Ray Data's defaults for actor pools today)
                # although 2.60 calls these arguments deprecated: the run depends on them
                warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated")
                blocks = min(len(ranges), max(BLOCKS_PER_WORKER * options.pool[1],
                                              -(-len(ranges) // RANGES_PER_BLOCK)))
                results = ray.data.from_items(ranges, override_num_blocks=blocks).map_batches(
                    ShardWorker, batch_size=1,
                    fn_constructor_kwargs={"config": asdict(job.config),
                                           "threads": max(1, int(options.cpus_per_worker))},
                    compute=ray.data.ActorPoolStrategy(min_size=options.pool[0], max_size=options.pool[1]),
                    num_cpus=options.cpus_per_worker, num_gpus=options.gpus_per_worker or None,
                    max_restarts=-1, max_task_retries=-1)
            try:
                for row in results.iter_rows():
                    computed += row["stop"] - row["start"]
                    invalid += row["invalid"]
                    view.update()
                    if progress:
                        progress(computed, todo, time.perf_counter() - begin)
            except CamexportError:
                raise
            except Exception as err:
                cause = _cause(err)
                if cause is not err:
                    raise cause from None
                raise
    writer.finish(job._whole_datasets())
    return RunSummary(Path(job.config.out), job.count, computed, invalid, time.perf_counter() - begin,
                      job.provider, engine=options.describe())
