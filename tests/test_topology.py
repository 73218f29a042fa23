"""Topology invariants under real mpiexec for 1, 2 and 3 facilities, plain and MPMD launches, R = 1 and
R > 1; each facility's own torch.distributed group; a failing or stalled rank ends the job."""
import json
import time

import pytest

from conftest import mpiexec
from mpifed.comm.topology import facility_of_ranks


def _seen(out, n):
    return [json.loads((out / f"rank-{i}.json").read_text()) for i in range(n)]


@pytest.mark.parametrize("sizes, roots, mpmd", [
    ([2], 1, False), ([1, 1], 1, False), ([2, 2], 1, False), ([2, 2], 2, True), ([1, 2, 3], 1, False),
    ([3, 1, 2], 1, True), ([2, 2, 2], 2, False),
])
def test_topology_invariants(tmp_path, sizes, roots, mpmd):
    mpiexec(sizes if mpmd else sum(sizes), "topology_worker.py", ",".join(map(str, sizes)), str(roots), str(tmp_path))
    seen = _seen(tmp_path, sum(sizes))
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    for s in seen:
        f = s["facility"]
        # ranks are assigned in listing order and the world is ordered by facility
        assert s["world_rank"] == offsets[f] + s["facility_rank"]
        assert s["world_size"] == sum(sizes) and s["facility_size"] == sizes[f] and s["offsets"] == offsets
        assert s["root_index"] == (s["facility_rank"] if s["facility_rank"] < roots else None)
        if s["root_index"] is not None:
            assert s["roots_size"] == len(sizes) and s["roots_rank"] == f
        else:
            assert s["roots_size"] is None
        expected_inter = {str(g): [sizes[0], sizes[g]] for g in range(1, len(sizes))} if f == 0 \
            else {"0": [sizes[f], sizes[0]]}
        assert s["inter"] == expected_inter
        assert s["global_root"] == (s["world_rank"] == 0)
    assert sorted(s["facility"] for s in seen) == [f for f, size in enumerate(sizes) for _ in range(size)]


def test_each_facility_gets_its_own_torch_group(tmp_path):
    sizes = [1, 2, 3]
    mpiexec(6, "topology_worker.py", "1,2,3", "1", str(tmp_path), "--torch")
    for s in _seen(tmp_path, 6):
        members = range(sum(sizes[:s["facility"]]), sum(sizes[:s["facility"] + 1]))
        assert s["torch_size"] == sizes[s["facility"]] and s["torch_sum"] == sum(members)


def test_rank_assignment_errors():
    assert facility_of_ranks([2, 1], [0, 0, 0]) == [0, 0, 1]
    assert facility_of_ranks([1, 2], [1, 0, 1]) == [1, 0, 1]
    with pytest.raises(ValueError, match="launch exactly 3 ranks"):
        facility_of_ranks([2, 1], [0, 0])
    with pytest.raises(ValueError, match="one program per facility"):
        facility_of_ranks([2, 1], [0, 1, 1])


@pytest.mark.parametrize("mode, words", [("raise", "rank one broke on purpose"),
                                         ("stall", "the test exchange did not finish within 2 s")])
def test_failure_aborts_the_job_instead_of_hanging(mode, words):
    start = time.monotonic()
    result = mpiexec(2, "abort_worker.py", mode, timeout=60, check=False)
    assert result.returncode != 0 and words in result.stderr
    assert time.monotonic() - start < 45
