from tstl.data.config import DataConfig
from tstl.twostage.groups import ClassGroups
from tstl.twostage.plan import expert_file, expert_overrides, pending_experts


GROUPS = ClassGroups(((0, 5), (1, 2, 3), (4, 6, 7)), 8)


def test_expert_overrides_filter_and_remap(tmp_path):
    o = expert_overrides(GROUPS, 2, tmp_path, init=["cast.pth"])
    assert o["data.labels"] == [4, 6, 7] and o["data.remap_labels"] is True
    assert o["model.num_classes"] == 3 and o["model.init"] == ["cast.pth"]
    assert o["out_dir"].endswith("expert_02")
    DataConfig(labels=o["data.labels"], remap_labels=True)  # the loader's config accepts them


def test_resume_skips_finished_experts(tmp_path):
    assert pending_experts(GROUPS, tmp_path) == [0, 1, 2]
    for g in (0, 2):
        expert_file(tmp_path, g).parent.mkdir(parents=True)
        expert_file(tmp_path, g).write_bytes(b"x")
    expert_file(tmp_path, 1).parent.mkdir(parents=True)  # killed mid-training: folder but no expert file
    assert pending_experts(GROUPS, tmp_path) == [1]


def test_cli_groups(tmp_path):
    import numpy as np

    from tstl.twostage.cli import main
    from tstl.twostage.groups import load_groups

    assert main(["groups", "--num-groups", "4", "--num-classes", "8", "--out", str(tmp_path / "b.json")]) == 0
    assert load_groups(tmp_path / "b.json").groups == ((0, 1), (2, 3), (4, 5), (6, 7))
    conf = np.eye(8) * 10
    for a, b in ((0, 7), (1, 6), (2, 5), (3, 4)):
        conf[a, b] = conf[b, a] = 5
    np.save(tmp_path / "c.npy", conf)
    assert main(["groups", "--method", "confusion", "--num-groups", "4", "--confusion", str(tmp_path / "c.npy"),
                 "--format", "tstl", "--out", str(tmp_path / "c.json")]) == 0
    assert load_groups(tmp_path / "c.json").groups == ((0, 7), (1, 6), (2, 5), (3, 4))
