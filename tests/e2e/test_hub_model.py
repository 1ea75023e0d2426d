"""A Hub model name reaches every actor as a local directory, resolved once on the driver.

Engines run with HF_HUB_OFFLINE=1 and start before any trainer would download anything, so a Hub name in
`model.path` used to find nothing on a fresh cache. Here the local HF cache is a temporary one, laid out as
`huggingface_hub` lays it out; no network is used."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_every_node_must_see_the_model_directory(ray_cluster, model_path, tmp_path):
    """The directory resolved on the driver is read by actors on every node: a node that cannot see it is
    named before any actor starts (one Ray task a node)."""
    from pipeline.driver import check_nodes_see
    from pipeline.placement import PlanError

    check_nodes_see({"model.path": model_path})
    with pytest.raises(PlanError, match="model.path: .*gone' is not visible on node .*shared filesystem"):
        check_nodes_see({"model.path": str(tmp_path / "gone")})


@pytest.mark.slow
def test_an_output_dir_a_trainer_node_cannot_write_is_refused(ray_cluster, tiny_cfg, tmp_path):
    """Checkpoints come from trainer rank 0's node. A directory that only the driver's node sees
    (here: one that no node has) is refused before any actor starts, naming the node and the fix."""
    from pipeline.driver import check_output_dir_reachable
    from pipeline.placement import PlanError
    from pipeline.rundir import RunDir

    cfg = tiny_cfg(tmp_path / "out")
    (tmp_path / "out").mkdir()
    check_output_dir_reachable(cfg, RunDir(tmp_path / "out"))
    with pytest.raises(PlanError, match="output_dir: .*elsewhere' is not writable from node .*trainer rank 0"):
        check_output_dir_reachable(cfg, RunDir(tmp_path / "elsewhere"))
    # only the nodes that could hold a rank are asked: none offers this resource, so none is asked
    far = tiny_cfg(tmp_path / "out", "train.resources={onalign_nowhere: 1}")
    check_output_dir_reachable(far, RunDir(tmp_path / "elsewhere"))
