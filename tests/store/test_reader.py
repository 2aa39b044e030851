"""The store's reader opens only what our schema allows: a Zarr v2 shard whose arrays carry a pickle
filter is refused, never read."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import pytest

import agd_pipeline.training as training
from agd_pipeline.errors import StoreError
from agd_pipeline.store import TrajectoryStore

from conftest import QUIET
from test_training import train_config


PICKLED_V2_SHARD = textwrap.dedent("""
    import json, os, pathlib, sys
    import numcodecs, numpy as np
    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + sys.argv[2],))
    shard = pathlib.Path(sys.argv[1])
    metadata = {".zgroup": {"zarr_format": 2}, ".zattrs": {}}
    (shard / ".zgroup").write_text(json.dumps(metadata[".zgroup"]))
    for name in ("guided_output", "model_input"):
        (shard / name).mkdir()
        array = {"zarr_format": 2, "shape": [1], "chunks": [1], "dtype": "|O", "compressor": None,
                 "fill_value": None, "order": "C", "filters": [{"id": "pickle", "protocol": 4}]}
        (shard / name / ".zarray").write_text(json.dumps(array))
        metadata[name + "/.zarray"] = array
        values = np.empty(1, dtype=object)
        values[0] = Payload()
        (shard / name / "0").write_bytes(numcodecs.Pickle().encode(values))
    # consolidated, as our shards are, so that a reader that accepts Zarr v2 would open it
    (shard / ".zmetadata").write_text(json.dumps({"zarr_consolidated_format": 1, "metadata": metadata}))
""")


@pytest.mark.bad_input
def test_a_zarr_v2_shard_with_a_pickle_filter_is_never_read(store_copy, tmp_path):
    """zarr 3.1 itself refuses pickled object arrays; shards are opened as Zarr v3 only, so this
    holds with a zarr that reads them too. Either way the shard is reported, never decoded."""
    marker = tmp_path / "pwned"
    shard = store_copy / "shard-000001.zarr"
    shutil.rmtree(shard)
    shard.mkdir()
    subprocess.run([sys.executable, "-c", PICKLED_V2_SHARD, str(shard), str(marker)], check=True)
    for full in (False, True):
        problems = TrajectoryStore(store_copy).problems(full=full)
        assert any(p.shard == "shard-000001.zarr" for p in problems), problems
    with pytest.raises(StoreError, match="shard-000001.zarr"):
        training.train(train_config(store_copy, tmp_path / "adapters", verify="cheap"), **QUIET)
    assert not marker.exists(), "a pickle inside a store was executed"
