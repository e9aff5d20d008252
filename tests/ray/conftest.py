"""One local Ray cluster for the Ray tests (package scope: started by the first, stopped after the last)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest


@pytest.fixture(scope="package")
def ray_address():
    """A local Ray cluster started in this process (2 physical cores: 4 logical CPUs so that two replicas
    and Ray's own work fit); its address lets `owlvid ... --ray-address` subprocesses join it."""
    import ray

    import owlvid

    # Ray's workers inherit this environment: they import the owlvid under test, with one torch thread each
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "OMP_NUM_THREADS", "HF_HUB_OFFLINE")}
    source = str(Path(owlvid.__file__).resolve().parents[1])
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (source, saved["PYTHONPATH"]) if p)
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
