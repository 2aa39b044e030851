"""Summaries of a trajectory store computed chunk by chunk with dask (stores larger than memory)."""

from __future__ import annotations

import numpy as np

from .store import TrajectoryStore


def summarise(store: TrajectoryStore, bins: int = 10, scheduler: str | None = None, workers: int = 2) -> dict:
    """Statistics computed chunk by chunk. ``scheduler``: a dask scheduler name, "distributed" for a
    dask.distributed LocalCluster, or a distributed scheduler's address."""
    if scheduler == "distributed" or (scheduler or "").startswith(("tcp://", "tls://", "inproc://")):
        from .errors import require

        require("distributed", f"--scheduler {scheduler}")
        from dask.distributed import Client, LocalCluster

        if scheduler == "distributed":
            with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                              dashboard_address=None) as cluster, Client(cluster) as client:
                return _summarise(store, bins, client.get)
        with Client(scheduler) as client:
            return _summarise(store, bins, client.get)
    return _summarise(store, bins, scheduler)


def _summarise(store: TrajectoryStore, bins: int, scheduler) -> dict:
    import dask
    import dask.array as da

    arrays = store.dask_arrays()
    stats = {}
    for name in ("model_input", "guided_output"):
        x = arrays[name].astype(np.float32)
        axes = (0, *range(2, x.ndim))  # everything but the step axis
        stats[name] = {"mean": x.mean(axis=axes), "std": x.std(axis=axes)}
    finite = {name: da.isfinite(a).all() for name, a in arrays.items() if a.dtype.kind == "f"}
    (stats, finite, w, timesteps) = dask.compute(
        stats, finite, arrays["guidance_scale"], arrays["timesteps"][0], scheduler=scheduler)
    counts, edges = np.histogram(w, bins=bins, range=(float(w.min()), float(w.max()) + 1e-6))
    raw = sum(a.nbytes for a in arrays.values())
    on_disk = store.bytes_on_disk()
    return {
        "trajectories": int(arrays["guidance_scale"].shape[0]),
        "steps": int(arrays["timesteps"].shape[1]),
        "latent_shape": list(arrays["model_input"].shape[2:]),
        "shards": len(store.shards),
        "bytes_on_disk": int(on_disk),
        "bytes_raw": int(raw),
        "compression_ratio": raw / max(1, on_disk),
        "guidance_histogram": {"counts": counts.tolist(), "edges": edges.tolist()},
        "timesteps": timesteps.tolist(),
        "per_step": {name: {k: v.tolist() for k, v in s.items()} for name, s in stats.items()},
        "finite": {k: bool(v) for k, v in finite.items()},
    }


def format_summary(summary: dict) -> str:
    lines = [
        f"trajectories: {summary['trajectories']}   steps: {summary['steps']}   latent: "
        f"{'x'.join(map(str, summary['latent_shape']))}   shards: {summary['shards']}",
        f"on disk: {summary['bytes_on_disk'] / 2**20:.2f} MiB   raw: {summary['bytes_raw'] / 2**20:.2f} MiB   "
        f"compression: {summary['compression_ratio']:.2f}x",
        "",
        "guidance scale w:",
    ]
    hist = summary["guidance_histogram"]
    top = max(hist["counts"]) or 1
    for count, lo, hi in zip(hist["counts"], hist["edges"], hist["edges"][1:]):
        lines.append(f"  [{lo:5.2f}, {hi:5.2f})  {count:6d}  {'#' * round(30 * count / top)}")
    lines += ["", "per step:   t   | model_input mean  std | guided_output mean  std"]
    mi, go = summary["per_step"]["model_input"], summary["per_step"]["guided_output"]
    for i, t in enumerate(summary["timesteps"]):
        lines.append(f"  {i:3d} {t:7.1f} | {mi['mean'][i]:10.4f} {mi['std'][i]:7.4f} | "
                     f"{go['mean'][i]:12.4f} {go['std'][i]:7.4f}")
    bad = [k for k, ok in summary["finite"].items() if not ok]
    lines += ["", "NaN/inf check: " + ("all arrays finite" if not bad else "NON-FINITE VALUES in " + ", ".join(bad))]
    return "\n".join(lines)
