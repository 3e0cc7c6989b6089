"""``calibrate``: check the data, draw the seeded calibration sample and save it as safetensors."""

from __future__ import annotations

from prefect import task
from safetensors.torch import save_file

from params import RunParams
from tasks.io import atomic_dir, data_spec, load_model, stage_dir, write_meta
from vlmprune.data.check import check_data
from vlmprune.profiling import measure


@task(name="calibrate")
def calibrate(params: RunParams) -> str:
    out = stage_dir(params, "calibrate")
    c = params.calibration
    check_data(data_spec(params), c.n_samples)  # a bad folder, file, column or count fails before the model loads
    with measure() as usage:
        adapter, loaded = load_model(params)
        data = adapter.make_calibration(loaded, data_spec(params), c.n_samples, c.seed)
    with atomic_dir(out) as tmp:
        save_file({k: v.contiguous() for k, v in data.items()}, str(tmp / "calibration.safetensors"))
        write_meta(tmp, "calibrate", usage.as_dict(), n_samples=c.n_samples, seed=c.seed)
    return str(out)
