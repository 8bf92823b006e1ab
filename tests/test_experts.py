"""Expert trajectories: flat parameters, the store's files and index, resume, incompatibility, the CLI."""

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from torch.func import functional_call

import builders.experts
from builders.build import build, recipe_from_dict
from builders.cli import build_command
from builders.errors import BuildError, RecipeError
from builders.experts import ExpertStore, ExpertStoreError, ParamLayout, expert_dir, flat_parameters
from builders.networks import build_network
from condensed_datasets.format import read_safetensors_metadata

EXPERTS = {
    "source": "fashionmnist", "method": "experts", "ipc": 1, "model": "ConvNetW32", "seed": 5,
    "real_per_class": 10, "augment": "color_crop_cutout_flip_scale_rotate",
    "params": {"num_experts": 2, "epochs": 2, "batch": 32},
    "eval": {"test_per_class": 10},
}


def run_experts(data_root, out, **params):
    recipe = recipe_from_dict({**EXPERTS, "params": {**EXPERTS["params"], **params}})
    return build(recipe, out_root=out, data_root=data_root, device="cpu", progress=False)


@pytest.mark.slow
def test_progress_is_quiet_off_a_terminal(fashion_mnist_root, tmp_path, capsys) -> None:
    """progress=True shows the experts' bar on a terminal only (the test's captured stderr is not one)."""
    recipe = recipe_from_dict({**EXPERTS, "params": {**EXPERTS["params"], "num_experts": 1, "epochs": 1}})
    build(recipe, out_root=tmp_path, data_root=fashion_mnist_root, device="cpu", progress=True)
    assert "experts fashionmnist" not in capsys.readouterr().err


def test_param_layout_unflattens_into_the_networks_shapes():
    net = build_network("ConvNetW32", 1, 10, (28, 28), seed=3)
    layout = ParamLayout.of(net)
    flat = flat_parameters(net)
    assert layout.numel == flat.numel() == sum(p.numel() for p in net.parameters())
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(functional_call(net, layout.unflatten(flat), (x,)), net(x))
    with pytest.raises(ValueError, match="flat parameters"):
        layout.unflatten(flat[:-1])


def test_experts_are_stored_as_safetensors_trajectories_with_an_index(fashion_mnist_root, tmp_path):
    store = run_experts(fashion_mnist_root, tmp_path)
    assert store.path == expert_dir(tmp_path, "fashionmnist", "ConvNetW32", False)
    assert store.path == tmp_path / "experts" / "fashionmnist" / "ConvNetW32" / "plain"
    index = json.loads((store.path / "index.json").read_text())
    p = ParamLayout.of(build_network("ConvNetW32", 1, 10, (28, 28), seed=0)).numel
    assert index["model"] == "ConvNetW32" and index["source"] == "fashionmnist" and index["zca"] is False
    assert index["epochs"] == 2 and index["num_experts"] == 2 and index["parameter_count"] == p
    assert index["training"]["lr"] == 0.01 and index["training"]["momentum"] == 0.0
    assert index["training"]["weight_decay"] == 0.0 and index["training"]["batch"] == 32
    assert [e["index"] for e in index["experts"]] == [0, 1]
    for entry in index["experts"]:
        assert 0.0 <= entry["test_accuracy"] <= 100.0 and entry["init_seed"] != entry["train_seed"]
        path = store.path / entry["file"]
        data = path.read_bytes()
        meta = json.loads(read_safetensors_metadata(data, str(path))["condensed_datasets_expert"])
        assert meta["test_accuracy"] == entry["test_accuracy"]
        traj = load_file(path)["trajectory"]
        assert traj.shape == (3, p) and traj.dtype == torch.float32
        # Row 0 is the initialisation the recorded seed gives; training moved the parameters.
        init = flat_parameters(build_network("ConvNetW32", 1, 10, (28, 28), seed=entry["init_seed"]))
        torch.testing.assert_close(traj[0], init)
        assert not torch.equal(traj[0], traj[2])
    reopened = ExpertStore.open(store.path)
    torch.testing.assert_close(reopened.snapshots(1, [2, 0]), reopened.trajectory(1)[[2, 0]])
    assert "2 experts x 2 epochs" in reopened.summary()


def test_resume_skips_finished_experts_and_recomputes_missing_ones_identically(fashion_mnist_root, tmp_path):
    store = run_experts(fashion_mnist_root, tmp_path)
    first = (store.path / "expert_0000.safetensors").read_bytes()
    second = (store.path / "expert_0001.safetensors").read_bytes()
    # Simulate a run killed during expert 1: its file and index entry are gone.
    (store.path / "expert_0001.safetensors").unlink()
    index = json.loads((store.path / "index.json").read_text())
    index["experts"] = index["experts"][:1]
    (store.path / "index.json").write_text(json.dumps(index))
    stamp = (store.path / "expert_0000.safetensors").stat().st_mtime_ns

    resumed = run_experts(fashion_mnist_root, tmp_path, num_experts=3)
    assert resumed.num_experts == 3
    assert (store.path / "expert_0000.safetensors").stat().st_mtime_ns == stamp  # skipped, not rewritten
    assert (store.path / "expert_0000.safetensors").read_bytes() == first
    assert (store.path / "expert_0001.safetensors").read_bytes() == second  # same seeds, same trajectory


def test_a_store_trained_otherwise_is_refused(fashion_mnist_root, tmp_path):
    run_experts(fashion_mnist_root, tmp_path, num_experts=1, epochs=1)
    with pytest.raises(ExpertStoreError, match="trained differently.*lr"):
        run_experts(fashion_mnist_root, tmp_path, num_experts=1, epochs=1, lr_teacher=0.02)
    with pytest.raises(ExpertStoreError, match="no expert trajectories"):
        ExpertStore.open(tmp_path / "nowhere")


def test_overwrite_is_refused_for_experts_and_leaves_the_store_as_it_was(fashion_mnist_root, tmp_path):
    """A store is extended by every run, never replaced: --overwrite, which would promise that, is an error."""
    store = run_experts(fashion_mnist_root, tmp_path, num_experts=1, epochs=1)
    before = {p.name: p.read_bytes() for p in store.path.iterdir() if p.is_file()}
    recipe = recipe_from_dict({**EXPERTS, "params": {**EXPERTS["params"], "num_experts": 1, "epochs": 1}})
    with pytest.raises(RecipeError, match="--overwrite\\) does not apply to method experts"):
        build(recipe, out_root=tmp_path, data_root=fashion_mnist_root, device="cpu", progress=False, overwrite=True)
    assert {p.name: p.read_bytes() for p in store.path.iterdir() if p.is_file()} == before


def test_experts_with_zca_store_the_whitening(fashion_mnist_root, tmp_path):
    store = run_experts(fashion_mnist_root, tmp_path, num_experts=1, epochs=1, zca=True)
    assert store.path.name == "zca" and store.zca_enabled
    zca = store.load_zca()
    assert zca.transform.shape == (784, 784) and zca.eps == 0.1


def test_condensed_build_runs_an_experts_recipe(fashion_mnist_root, tmp_path):
    recipe = tmp_path / "experts.yaml"
    import yaml

    recipe.write_text(yaml.safe_dump({**EXPERTS, "params": {**EXPERTS["params"], "num_experts": 1, "epochs": 1}}))
    result = CliRunner().invoke(build_command, [str(recipe), "--out", str(tmp_path / "out"), "--data-root",
                                                str(fashion_mnist_root), "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "1 experts x 1 epochs of ConvNetW32" in result.output
    assert (tmp_path / "out" / "experts" / "fashionmnist" / "ConvNetW32" / "plain" / "expert_0000.safetensors").is_file()
    assert not (tmp_path / "out" / "condensed").exists()


def test_gsam_experts_live_apart_and_record_their_optimiser(fashion_mnist_root, tmp_path):
    gsam = run_experts(fashion_mnist_root, tmp_path, num_experts=1, epochs=1, optimizer="gsam")
    assert gsam.path == expert_dir(tmp_path, "fashionmnist", "ConvNetW32", False, "gsam")
    assert gsam.path.name == "plain_gsam"
    training = gsam.index["training"]
    assert (training["optimizer"], training["rho_max"], training["alpha"], training["adaptive"]) == ("GSAM", 0.01, 0.3, True)
    sgd = run_experts(fashion_mnist_root, tmp_path, num_experts=1, epochs=1)
    assert sgd.path.name == "plain"
    # Same seeds, different optimiser: different trajectories after the first epoch, same start.
    a, b = gsam.trajectory(0), sgd.trajectory(0)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])
    with pytest.raises(ExpertStoreError, match="trained with sgd, the recipe needs gsam.*params.optimizer=gsam"):
        sgd.check_compatible(source="fashionmnist", model="ConvNetW32", zca=False, parameter_count=sgd.parameter_count,
                             min_epochs=1, optimizer="gsam",
                             build_hint="condensed-build recipes/experts_fashionmnist.yaml --set params.optimizer=gsam")


def test_an_experts_recipe_refuses_a_schedule_gsam_cannot_follow():
    from builders.recipe import RecipeError

    with pytest.raises(RecipeError, match="rho_min"):
        recipe_from_dict({**EXPERTS, "params": {**EXPERTS["params"], "optimizer": "gsam", "rho_min": 0.0}})
    with pytest.raises(RecipeError, match="params.optimizer"):
        recipe_from_dict({**EXPERTS, "params": {**EXPERTS["params"], "optimizer": "adam"}})


def test_a_zca_store_fitted_before_the_raw_pixel_rule_is_refused(fashion_mnist_root, tmp_path):
    from safetensors.torch import save as st_save

    from builders.experts import ZCA_KEY, ZCA_NAME

    store = run_experts(fashion_mnist_root, tmp_path, num_experts=1, epochs=1, zca=True)
    zca = store.load_zca()
    (store.path / ZCA_NAME).write_bytes(st_save(zca.tensors(), metadata={ZCA_KEY: json.dumps({"eps": 0.1})}))
    with pytest.raises(ExpertStoreError, match="normalised images.*rebuild"):
        store.load_zca()


def _trajectories(store):
    return {e["index"]: load_file(store.path / e["file"])["trajectory"] for e in store.index["experts"]}


def test_experts_trained_together_follow_the_trajectories_trained_one_by_one(fashion_mnist_root, tmp_path):
    # 100 images in batches of 32: the last batch of every epoch is partial; per-sample DSA from each expert's own
    # generator; 3 experts at once, then the fourth alone in a group of its own
    alone = run_experts(fashion_mnist_root, tmp_path / "alone", num_experts=4, together=False)
    together = run_experts(fashion_mnist_root, tmp_path / "together", num_experts=4, together=True, together_group=3)
    one, many = _trajectories(alone), _trajectories(together)
    assert sorted(many) == [0, 1, 2, 3]
    for k in range(4):
        assert torch.equal(one[k][0], many[k][0])  # the same initialisation, from the same seed
        torch.testing.assert_close(many[k], one[k], rtol=1e-4, atol=1e-5)
    for a, b in zip(alone.index["experts"], together.index["experts"]):
        assert (a["init_seed"], a["train_seed"]) == (b["init_seed"], b["train_seed"])
        assert abs(a["train_accuracy"] - b["train_accuracy"]) <= 1.0  # 1 of 100 rows at most, at a rounding tie
    assert [e.get("trained_together") for e in together.index["experts"]] == [3, 3, 3, None]
    assert "trained_together" not in alone.index["experts"][0]


def test_together_is_refused_where_it_cannot_apply(fashion_mnist_root, tmp_path):
    with pytest.raises(Exception, match="GSAM experts .* train one by one"):
        recipe_from_dict({**EXPERTS, "params": {**EXPERTS["params"], "optimizer": "gsam", "together": True}})
    with pytest.raises(Exception, match="params.together"):
        recipe_from_dict({**EXPERTS, "params": {**EXPERTS["params"], "together": "yes"}})
    with pytest.raises(Exception, match="BatchNorm.*set params.together: auto or false"):
        recipe = recipe_from_dict({**EXPERTS, "model": "AlexNetBN", "params": {**EXPERTS["params"], "together": True}})
        build(recipe, out_root=tmp_path, data_root=fashion_mnist_root, device="cpu", progress=False)
    # auto on a CPU: one by one, as before
    store = run_experts(fashion_mnist_root, tmp_path / "auto", num_experts=2, epochs=1)
    assert all("trained_together" not in e for e in store.index["experts"])


def _out_of_memory(*args, **kwargs):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_experts_at_once_out_of_gpu_memory_fall_back_to_one_by_one(fashion_mnist_root, tmp_path, monkeypatch):
    # a real out-of-memory needs a GPU: here the group's training raises the error CUDA's allocator raises
    plain = run_experts(fashion_mnist_root, tmp_path / "plain", num_experts=2, epochs=1, together=False)
    monkeypatch.setattr(builders.experts, "use_together", lambda device, count: True)  # auto: together here
    monkeypatch.setattr(builders.experts, "train_experts_together", _out_of_memory)
    with pytest.warns(UserWarning, match="2 experts at once ran out of GPU memory; the remaining experts train one"):
        fallback = run_experts(fashion_mnist_root, tmp_path / "auto", num_experts=2, epochs=1)
    for a, b in zip(plain.index["experts"], fallback.index["experts"]):
        assert (plain.path / a["file"]).read_bytes() == (fallback.path / b["file"]).read_bytes()
    with pytest.raises(BuildError, match="ran out of GPU memory.*lower params.together_group"):
        run_experts(fashion_mnist_root, tmp_path / "forced", num_experts=2, epochs=1, together=True)


def test_experts_fall_back_on_cudnns_out_of_memory_but_not_on_other_errors(fashion_mnist_root, tmp_path, monkeypatch):
    # cuDNN reports running out of workspace memory as a plain RuntimeError; any other error stops the build
    def raising(message):
        def train(*args, **kwargs):
            raise RuntimeError(message)
        return train

    monkeypatch.setattr(builders.experts, "use_together", lambda device, count: True)
    monkeypatch.setattr(builders.experts, "train_experts_together", raising("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    with pytest.warns(UserWarning, match="2 experts at once ran out of GPU memory"):
        store = run_experts(fashion_mnist_root, tmp_path / "cudnn", num_experts=2, epochs=1)
    assert len(store.index["experts"]) == 2
    monkeypatch.setattr(builders.experts, "train_experts_together", raising("mat1 and mat2 shapes cannot be multiplied"))
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        run_experts(fashion_mnist_root, tmp_path / "broken", num_experts=2, epochs=1)
