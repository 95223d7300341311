"""Files written atomically (checkpoints, exported models, NIR files) get the umask's
permissions like the rest of a run directory, not the temporary file's 0600."""
import os
import stat

import pytest
import torch

from spikegrad import checkpoint


@pytest.fixture
def umask():
    """Set the process umask for one test, restoring the old one after."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask,want", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_checkpoint_gets_the_umask_permissions(tmp_path, umask, mask, want):
    umask(mask)
    path = checkpoint.save({"kind": "run", "value": torch.ones(2)}, tmp_path / "last.pt")
    plain = tmp_path / "metrics.jsonl"
    plain.write_text("{}\n")                                  # how the run's other files are made
    assert mode(path) == mode(plain) == want
    path.chmod(0o600)                                         # a file from before the fix
    checkpoint.save({"kind": "run", "value": torch.zeros(2)}, path)
    assert mode(path) == want
    assert checkpoint.load(path)["value"].sum() == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "metrics.jsonl"]   # no temp file left


def test_atomic_write_of_any_file(tmp_path, umask):
    umask(0o022)
    path = checkpoint.atomic_write(tmp_path / "sub" / "model.nir", lambda tmp: tmp.write_bytes(b"graph"))
    assert mode(path) == 0o644 and path.read_bytes() == b"graph"
