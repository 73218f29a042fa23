"""Writes round 2 of a large checkpoint into FOLDER (round 1 must already be there); the test kills it
part-way to show that `latest` never points at a broken file.

    python tests/mpi/write_worker.py FOLDER NUMEL
"""
import sys
from pathlib import Path

import numpy as np

from mpifed.checkpoint import format as checkpoint
from mpifed.layout import FlatLayout, ParamSlot

folder, numel = Path(sys.argv[1]), int(sys.argv[2])
layout = FlatLayout((ParamSlot("a", (numel // 2,), "float32", 0), ParamSlot("b", (numel - numel // 2,), "float32", numel // 2)))
model = np.full(numel, 2.0, np.float32)
attrs = dict(tokens=2, model_config="{}", facilities="[]", config="")
print("writing", flush=True)
checkpoint.publish(checkpoint.write_main(folder, 2, attrs, layout, [(0, numel)], ["momentum"], [], model=model,
                                         outer={"momentum": model}))
