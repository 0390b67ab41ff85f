"""Extraction: checkpoint layouts, loading reports, hooks, the pipeline, resume and Ctrl-C."""

import argparse
import collections
import contextlib
import dataclasses
import gc
import hashlib
import inspect
import io
import json
import logging
import math
import os
import pickle
import random
import re
import shlex
import signal
import subprocess
import sys
import time
import warnings

import h5py
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.utils.data import default_collate

from conftest import requires_cuda
from marstore import extract as extract_module, hooks
from marstore.cli import main
from marstore.extract import ExtractError, ExtractOptions, Interrupted, _duration, extract, extract_from
from marstore.loading import CheckpointError, build_model, config_object, file_digest, find_config, find_state_dict, LoadReport, load_weights, read_checkpoint, to_plain
from marstore.models.video_mar import VideoActionMAR
from marstore.models import LAYOUTS, policy_forward, save_checkpoint, synthetic_video_actions, video_mar
from marstore.report import human_bytes
from marstore.store import LayerSpec, StoreError, StoreWriter, open_store

CONFIG = {"task_name": "t", "shape_meta": {"action": {"shape": [2]}, "horizon": 16}, "embed_dim": 32,
          "depth": 2, "decoder_depth": 2, "num_heads": 2}
CONFIG_KEY = {"workspace": "cfg.policy.model"}
ROOT = os.path.dirname(os.path.dirname(__file__))


def options(tmp_path, **kw):
    base = dict(out=str(tmp_path / "s.h5"), model="marstore.models:video_mar", dataset="marstore.models:synthetic_video_actions",
                dataset_args={"size": 40}, forward="marstore.models:policy_forward", layers=["encoder_blocks.*"],
                targets=["nactions", "label"], batch_size=8, progress=False, model_args=dict(CONFIG), device="cpu")
    base.update(kw)
    return ExtractOptions(**base)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_loads_the_right_weights(tmp_path, layout):
    torch.manual_seed(0)
    model = video_mar(**CONFIG)
    path = str(tmp_path / "c.pt")
    save_checkpoint(model, CONFIG, path, layout)
    ckpt = read_checkpoint(path)
    config, key = find_config(ckpt, CONFIG_KEY.get(layout))
    state, state_key = find_state_dict(ckpt)
    fresh = build_model("marstore.models:video_mar", config, {} if config else CONFIG, key)
    report = load_weights(fresh, state, strict=True)
    ema = layout in ("mar", "workspace", "dit", "timm", "ema_pytorch", "lightning_ema")
    expected = {k: v * (0.5 if ema and v.is_floating_point() and k in dict(model.named_parameters()) else 1)
                for k, v in model.state_dict().items()}
    got = fresh.state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in got)
    assert report.missing == [] and report.unexpected == [] and report.shape_mismatches == []
    assert state_key == {"bare": "(bare state dict)", "mar": "model_ema", "workspace": "state_dicts.ema_model",
                         "lightning": "state_dict", "fsdp": "model", "deepspeed": "module", "dit": "ema", "timm": "state_dict_ema",
                         "ema_pytorch": "ema", "lightning_ema": "state_dict"}.get(layout, "model_state_dict")
    assert report.stripped_prefix == {"lightning": "model.", "workspace": "model.", "ddp": "module.",
                                      "compile": "_orig_mod.", "ema_pytorch": "ema_model.",
                                      "lightning_ema": "model_ema.module."}.get(layout)
    if layout in ("workspace", "ema_pytorch", "lightning_ema"):
        assert report.ignored_outside_prefix == {"workspace": 2, "ema_pytorch": len(expected) + 2,
                                                 "lightning_ema": len(expected)}[layout]
    if layout in ("bare", "deepspeed"):
        assert key is None and config == {}
    else:
        assert config["embed_dim"] == 32


def test_an_ema_entry_that_is_not_a_state_dict_is_passed_over_in_the_log(caplog):
    state = video_mar(**CONFIG).state_dict()
    shadow = {"decay": 0.9999, "optimization_step": 3, "shadow_params": [v.clone() for v in state.values()]}  # diffusers' EMAModel
    with caplog.at_level(logging.WARNING, logger="marstore.loading"):
        found, key = find_state_dict({"model": state, "ema": shadow, "args": {}})
    assert key == "model" and found.keys() == state.keys()
    assert ("checkpoint['ema'] holds EMA weights but is not a state dict (it holds decay, optimization_step, shadow_params): "
            "looking further; the weights taken are not the EMA ones") in caplog.text


class WithRotary(nn.Module):
    """A block whose rotary frequencies __init__ computes: a buffer no checkpoint holds."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.register_buffer("freqs", torch.arange(4.0), persistent=False)

    def forward(self, x):
        return self.proj(x) * self.freqs


def test_a_model_built_on_the_meta_device_takes_the_checkpoints_tensors(tmp_path):
    torch.manual_seed(0)
    saved = video_mar(**CONFIG)
    state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in saved.state_dict().items()}
    with torch.device("meta"):
        model = video_mar(**CONFIG)
    report = load_weights(model, state, strict=True)
    assert report.loaded == len(state) and not any(t.is_meta for t in model.state_dict().values())
    built = video_mar(**CONFIG)
    built.load_state_dict(state)  # as a model built with values takes them: the dtype it was built with
    assert all(torch.equal(model.state_dict()[k], v) and model.state_dict()[k].dtype == v.dtype
               for k, v in built.state_dict().items())
    with torch.device("meta"):
        rotary = WithRotary()
    with pytest.raises(CheckpointError) as info:
        load_weights(rotary, WithRotary().state_dict())
    assert str(info.value) == (
        "the model was built on the meta device, and 1 of its tensors have no values (freqs): the checkpoint gives no "
        "values for them; build those with values (buffers that __init__ computes, such as rotary frequencies, are not "
        "in a checkpoint), or load a checkpoint that holds them")
    with pytest.raises(ExtractError, match=r"^the model was built on the meta device, and 2 of its tensors have no values "
                                           r"\(0.weight, 0.bias\): no checkpoint= gives them values"):
        extract_from(nn.Sequential(nn.Linear(3, 2, device="meta")), torch.utils.data.TensorDataset(torch.randn(8, 3)),
                     str(tmp_path / "s.h5"), ["0"], progress=False)
    assert os.listdir(tmp_path) == []
    # with a checkpoint, the run is the one of the model built with values
    data, valued = torch.utils.data.TensorDataset(torch.randn(8, 3)), nn.Sequential(nn.Linear(3, 2))
    torch.save(valued.state_dict(), tmp_path / "w.pt")
    runs = [extract_from(m, data, str(tmp_path / f"{i}.h5"), ["0"], checkpoint=str(tmp_path / "w.pt"), progress=False)
            for i, m in enumerate((valued, nn.Sequential(nn.Linear(3, 2, device="meta"))))]
    with open_store(runs[0].path) as a, open_store(runs[1].path) as b:
        assert a.read("0").tobytes() == b.read("0").tobytes()


def test_load_report_and_strict(tmp_path):
    model = video_mar(**CONFIG)
    state = dict(model.state_dict())
    state.pop("decoder_norm.weight")
    state["extra.weight"] = torch.zeros(1)
    state["z_proj.bias"] = torch.zeros(3)
    report = load_weights(video_mar(**CONFIG), state)
    assert report.missing == ["z_proj.bias", "decoder_norm.weight"] or sorted(report.missing) == ["decoder_norm.weight", "z_proj.bias"]
    assert report.unexpected == ["extra.weight"]
    assert report.shape_mismatches == ["z_proj.bias: checkpoint (3,), model (32,)"]
    with pytest.raises(CheckpointError, match=r"--strict: the checkpoint does not fit the model: .*2 missing .*1 unexpected .*1 shape mismatches"):
        load_weights(video_mar(**CONFIG), state, strict=True)


def test_another_prefix_is_stripped_or_added_where_it_fits_most_weights(caplog):
    saved = video_mar(**CONFIG)
    names = list(saved.state_dict())
    state = {"net.backbone." + k: v for k, v in saved.state_dict().items()} | {"net.head.weight": torch.zeros(2)}
    fresh = video_mar(**CONFIG)
    with caplog.at_level(logging.INFO, logger="marstore.loading"):
        report = load_weights(fresh, state)
    assert report.stripped_prefix == "net.backbone." and report.ignored_outside_prefix == 1
    assert report.loaded == len(names) and report.missing == report.unexpected == []
    assert all(torch.equal(fresh.state_dict()[k], saved.state_dict()[k]) for k in names)
    assert f"stripped (1 keys outside it ignored; {len(names)} of the model's {len(names)} weights fit then)" in caplog.text

    class Policy(nn.Module):  # the checkpoint is the network that it holds inside it
        def __init__(self):
            super().__init__()
            self.net, self.norm = video_mar(**CONFIG), nn.LayerNorm(4)

    policy = Policy()
    report = load_weights(policy, saved.state_dict())
    assert report.added_prefix == "net." and report.stripped_prefix is None
    assert report.loaded == len(names) and report.missing == ["norm.weight", "norm.bias"]
    assert all(torch.equal(policy.net.state_dict()[k], saved.state_dict()[k]) for k in names)
    assert "added prefix 'net.'; 2 missing (first: norm.weight, norm.bias)" in report.summary()


def test_ema_weights_beside_the_models_are_taken_and_the_other_copy_named(caplog):
    saved = video_mar(**CONFIG).state_dict()
    state = {**{f"model.{k}": v for k, v in saved.items()}, **{f"model_ema.module.{k}": v * 2 for k, v in saved.items()}}
    model = video_mar(**CONFIG)
    with caplog.at_level(logging.INFO, logger="marstore.loading"):
        report = load_weights(model, state, strict=True, report=LoadReport(state_key="state_dict"))
    assert report.stripped_prefix == "model_ema.module." and all(torch.equal(model.state_dict()[k], v * 2)
                                                                for k, v in saved.items())
    assert (f"the EMA weights' prefix 'model_ema.module.' taken; 'model.' fit the model's weights as well ({len(saved)} "
            "of them; --state-key state_dict.model takes those)") in caplog.text
    other, key = find_state_dict({"state_dict": state}, "state_dict.model")
    assert load_weights(video_mar(**CONFIG), other, strict=True).loaded == len(saved)


def test_a_checkpoint_of_which_nothing_loads_is_refused():
    saved = video_mar(**CONFIG).state_dict()
    first = next(iter(saved))
    # two copies (a student's and a teacher's) fit alike: which one is meant cannot be told
    state = {f"{who}.{k}": v for who in ("student", "teacher") for k, v in saved.items()}
    with pytest.raises(CheckpointError) as info:
        load_weights(video_mar(**CONFIG), state)
    assert str(info.value) == (
        f"none of the checkpoint's {len(state)} tensors loads into the model's {len(saved)} weights ({len(state)} under "
        f"names the model lacks, 0 of another shape; the checkpoint's keys look like 'student.{first}', the model's "
        f"like '{first}'); the prefixes 'student.', 'teacher.', each removed, would fit {len(saved)} of the model's "
        f"{len(saved)} weights alike: take one's tensors with --state-key 'student' or 'teacher'")
    fresh = video_mar(**CONFIG)
    state, key = find_state_dict({"state_dict": state}, "state_dict.teacher")
    assert key == "state_dict.teacher" and list(state) == list(saved)
    report = load_weights(fresh, state, strict=True, report=LoadReport(state_key=key))
    assert report.loaded == len(saved) and report.stripped_prefix is None
    assert list(find_state_dict({f"teacher.{k}": v for k, v in saved.items()}, "teacher")[0]) == list(saved)
    with pytest.raises(CheckpointError, match=r"^--state-key 'tutor': no tensor of the checkpoint's state dict is named tutor\.\*; "
                       r"--state-key PREFIX takes those named PREFIX\.\*, of \['student', 'teacher'\]$"):
        find_state_dict({f"{who}.{k}": v for who in ("student", "teacher") for k, v in saved.items()}, "tutor")
    part = dict(list(saved.items())[:3])  # fewer than half of the model's weights: named, not stripped
    with pytest.raises(CheckpointError, match=rf"; removing the prefix 'ema\.' from the checkpoint's keys would fit 3 of the "
                       rf"model's {len(saved)} weights; choose other weights with --state-key"):
        load_weights(video_mar(**CONFIG), {f"ema.{k}": v for k, v in part.items()})
    other = {"a.weight": torch.zeros(3)}
    with pytest.raises(CheckpointError, match=r"^none of the checkpoint's 1 tensors loads into the model's \d+ weights \(1 under "
                       r"names the model lacks, 0 of another shape; the checkpoint's keys look like 'a.weight', the model's "
                       f"like '{first}'\\); choose other weights"):
        load_weights(video_mar(**CONFIG), other)
    wrong_shapes = {k: torch.zeros(7) for k in saved}
    with pytest.raises(CheckpointError, match=rf"\(0 under names the model lacks, {len(saved)} of another shape;"):
        load_weights(video_mar(**CONFIG), wrong_shapes)
    zero3 = {k: torch.empty(0) for k in saved}  # a DeepSpeed ZeRO-3 checkpoint's mp_rank_00_model_states.pt
    with pytest.raises(CheckpointError, match=r"; its tensors are all empty, as a DeepSpeed ZeRO-3 checkpoint's model states "
                                              r"are \(its weights lie in its optimizer shards\): make one file of them with "
                                              r"DeepSpeed's zero_to_fp32.py; choose other weights"):
        load_weights(video_mar(**CONFIG), zero3)


class Opaque:
    def __init__(self):
        self.x = 1


def test_numpy_numbers_and_arrays_and_plain_values_load_safely(tmp_path):
    """Training scripts keep metrics and their RNG state as numpy values beside the weights, and
    paths and times in their arguments: data, which the safe load reads; an object array of some
    class still needs its class trusted."""
    import datetime
    import pathlib

    path = str(tmp_path / "c.pt")
    rng = np.random.get_state()
    started = datetime.datetime(2026, 12, 8, 5, 30, tzinfo=datetime.timezone.utc)
    args = argparse.Namespace(data_dir=pathlib.Path("/data/uva"), started=started, every=datetime.timedelta(hours=1),
                              tasks=frozenset(["pick"]), window=slice(0, 16), steps=range(3))
    torch.save({"model_state_dict": video_mar(**CONFIG).state_dict(), "best": np.float64(0.25), "step": np.int64(7),
                "history": np.arange(6, dtype=np.float32).reshape(2, 3), "flags": np.array([True, False]),
                "names": np.array(["a", "bc"]), "rng": rng, "args": args}, path)
    ckpt = read_checkpoint(path)
    assert ckpt["args"] == args
    assert ckpt["best"] == 0.25 and type(ckpt["best"]) is np.float64 and ckpt["step"] == 7
    assert ckpt["history"].dtype == np.float32 and ckpt["history"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert ckpt["flags"].tolist() == [True, False] and ckpt["names"].tolist() == ["a", "bc"]
    assert ckpt["rng"][0] == "MT19937" and np.array_equal(ckpt["rng"][1], rng[1]) and ckpt["rng"][2:] == rng[2:]
    torch.save({"model_state_dict": video_mar(**CONFIG).state_dict(), "objects": np.array([Opaque()], dtype=object)}, path)
    with pytest.raises(CheckpointError, match=r"needs unpickling of test_extract\.Opaque, which a safe load refuses"):
        read_checkpoint(path)


def test_untrusted_pickle_is_refused_with_the_flag_named(tmp_path):
    path = str(tmp_path / "c.pt")
    torch.save({"model_state_dict": video_mar(**CONFIG).state_dict(), "extra": Opaque()}, path)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    assert "test_extract.Opaque" in str(info.value) and "--trust-checkpoint" in str(info.value)
    assert isinstance(read_checkpoint(path, trust=True)["extra"], Opaque)
    # files that no torch.save wrote: said as such, trusted or not (they were 'classes it does not name')
    (tmp_path / "build.py").write_text("import torch\n")
    with h5py.File(tmp_path / "acts.h5", "w"):
        pass
    for name, what in (("build.py", "a file that starts b'import t'"), ("acts.h5", "an HDF5 file (a marstore store?)")):
        for trust in (False, True):
            with pytest.raises(CheckpointError) as info:
                read_checkpoint(str(tmp_path / name), trust=trust)
            assert str(info.value) == (f"checkpoint {tmp_path / name} is not a file that torch.save or safetensors writes "
                                       f"(a zip archive, or a pickle of torch's legacy format): it is {what}")
    # a TorchScript archive runs its code as it loads: said as such (it was 'classes it does not name')
    scripted = str(tmp_path / "scripted.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(nn.Linear(2, 3)), scripted)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(scripted)
    assert str(info.value) == (f"checkpoint {scripted} is a TorchScript archive (torch.jit.save), which a safe load does "
                               "not read: its code runs as it loads; if you trust its source, pass --trust-checkpoint "
                               "(its weights are then the module's state_dict)")
    with warnings.catch_warnings():  # torch.load: 'dispatching to torch.jit.load', which is deprecated
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        state, key = find_state_dict(read_checkpoint(scripted, trust=True))
    assert key == "(whole module)" and {k: tuple(v.shape) for k, v in state.items()} == {"weight": (3, 2), "bias": (3,)}


def test_a_trusted_checkpoint_whose_classes_are_not_here_loads_them_as_stand_ins(tmp_path, monkeypatch, caplog, capsys):
    # UVA's workspace pickles its normalizer and more beside the weights; the training package
    # need not be installed where the activations are extracted
    (tmp_path / "gone_module.py").write_text("class Normalizer:\n    def __init__(self):\n        self.scale = 2.0\n"
                                             "def build():\n    return Normalizer()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import gone_module

    torch.manual_seed(0)
    state = {"model." + k: v for k, v in video_mar(**CONFIG).state_dict().items()}
    path = str(tmp_path / "c.pt")
    torch.save({"cfg": {"policy": {"model": CONFIG}}, "state_dicts": {"model": state, "ema_model": state},
                "pickles": {"normalizer": gone_module.Normalizer(), "factory": gone_module.build}}, path)
    bad = str(tmp_path / "bad.pt")
    torch.save({"model": state, "cfg": gone_module.Normalizer()}, bad)
    (tmp_path / "gone_module.py").unlink()
    monkeypatch.delitem(sys.modules, "gone_module")

    from marstore.loading import LoadReport, StandIn

    report = LoadReport()
    ckpt = read_checkpoint(path, trust=True, report=report)
    normalizer = ckpt["pickles"]["normalizer"]
    assert isinstance(normalizer, StandIn) and normalizer.scale == 2.0
    assert repr(normalizer) == "<stand-in for gone_module.Normalizer>"
    assert issubclass(ckpt["pickles"]["factory"], StandIn)
    note = "stand-ins for gone_module.Normalizer, gone_module.build, whose code is not importable here"
    assert report.notes == [note]
    assert f"checkpoint {path}: {note} (install their package if the model needs them)" in caplog.text
    result = extract(options(tmp_path, checkpoint=path, trust_checkpoint=True, config_key="cfg.policy.model", model_args={}))
    with open_store(result.path) as s:
        assert s.metadata["load_report"]["notes"] == [note] and s.metadata["load_report"]["missing_count"] == 0

    capsys.readouterr()
    assert main(["info", result.path]) == 0
    assert (f"  weights from 'state_dicts.ema_model': loaded 82 tensors (prefix 'model.' stripped), 0 missing, 0 unexpected, "
            "0 shape mismatches; "
            f"{note}") in capsys.readouterr().out.splitlines()
    with pytest.raises(CheckpointError) as info:  # the config itself is one: nothing to build from
        find_config(read_checkpoint(bad, trust=True), "cfg")
    assert str(info.value) == ("checkpoint['cfg'] is a gone_module.Normalizer, whose code is not importable here; "
                               "install its package (gone_module)")
    newer = tmp_path / "newer.pt"  # a pickle naming what only another torch has: no stand-in for torch's own
    newer.write_bytes(b"\x80\x02ctorch\n_rebuild_from_the_future\nq\x00)\x81q\x01.")
    with pytest.raises(CheckpointError, match=r"needs what this torch or numpy lacks \(Can't get attribute "
                                              r"'_rebuild_from_the_future' .*\); was it saved by another version\?"):
        read_checkpoint(str(newer), trust=True)


def test_argparse_namespace_is_allowed_in_a_safe_load(tmp_path):
    path = str(tmp_path / "c.pt")
    save_checkpoint(video_mar(**CONFIG), CONFIG, path, "mar")
    config, key = find_config(read_checkpoint(path))
    assert key == "args" and config["depth"] == 2


def test_a_model_saved_whole_gives_its_weights_to_a_trusted_load(tmp_path):
    torch.manual_seed(1)
    model = video_mar(**CONFIG)
    for name, saved in (("whole.pt", model), ("dict.pt", {"model": model, "epoch": 3})):  # torch.save(model), or in a dict
        torch.save(saved, tmp_path / name)
        with pytest.raises(CheckpointError) as info:  # its own classes first, then torch's
            read_checkpoint(str(tmp_path / name))
        assert str(info.value).startswith(
            f"checkpoint {tmp_path / name} needs unpickling of marstore.models.video_mar.ActionHead, marstore.models."
            "video_mar.Block, marstore.models.video_mar.DiffHead, marstore.models.video_mar.VideoActionMAR, torch.nn.")
        state, key = find_state_dict(read_checkpoint(str(tmp_path / name), trust=True))
        assert key == ("(whole module)" if name == "whole.pt" else "model")
        assert state.keys() == model.state_dict().keys() and all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with pytest.raises(CheckpointError, match=r"^--state-key 'ema': no tensor of the checkpoint's state dict is named ema\.\*; "
                       r"--state-key PREFIX takes those named PREFIX\.\*, of \['action_proj', 'decoder_blocks', "):
        find_state_dict(model, "ema")
    state, key = find_state_dict(model, "encoder_blocks.1")  # a module of a model saved whole
    assert key == "encoder_blocks.1" and state.keys() == model.encoder_blocks[1].state_dict().keys()


def test_a_safetensors_checkpoint_is_a_state_dict_without_pickles(tmp_path, monkeypatch):
    st = pytest.importorskip("safetensors.torch")
    torch.manual_seed(2)
    model = video_mar(**CONFIG)
    path = str(tmp_path / "model.safetensors")
    st.save_file({k: v.clone() for k, v in model.state_dict().items()}, path, metadata={"format": "pt"})
    state, key = find_state_dict(read_checkpoint(path))
    assert key == "(bare state dict)" and all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    result = extract(options(tmp_path, checkpoint=path, num_samples=8))
    assert result.load_report["loaded"] == len(model.state_dict()) and result.load_report["missing_count"] == 0
    (tmp_path / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{nonsense")
    with pytest.raises(CheckpointError, match=r"^checkpoint .*broken.safetensors cannot be read as safetensors \("):
        read_checkpoint(str(tmp_path / "broken.safetensors"))
    monkeypatch.setitem(sys.modules, "safetensors", None)  # not installed
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    assert str(info.value) == (f"checkpoint {path} is a safetensors file, and reading one needs the safetensors package: "
                               "pip install safetensors")


@pytest.mark.parametrize("shard_format", ["safetensors", "bin"])
def test_a_sharded_checkpoint_is_read_through_its_index(tmp_path, shard_format):
    """Hugging Face's sharded checkpoints: an index (model.safetensors.index.json) naming the
    shard of each tensor; the run loads them together, and its digest covers every shard."""
    torch.manual_seed(3)
    model = video_mar(**CONFIG)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    names = list(state)
    shards = {f"model-0000{i + 1}-of-00002.{shard_format}": names[i::2] for i in range(2)}
    for file, part in shards.items():
        if shard_format == "safetensors":
            pytest.importorskip("safetensors.torch").save_file({k: state[k] for k in part}, str(tmp_path / file))
        else:
            torch.save({k: state[k] for k in part}, tmp_path / file)
    index = tmp_path / f"model.{shard_format}.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": {k: f for f, part in shards.items() for k in part}}))
    loaded, key = find_state_dict(read_checkpoint(str(index)))
    assert key == "(bare state dict)" and sorted(loaded) == sorted(state) and all(torch.equal(loaded[k], v) for k, v in state.items())
    result = extract(options(tmp_path, checkpoint=str(index), num_samples=8))
    assert result.load_report["loaded"] == len(state) and result.load_report["missing_count"] == 0
    with open_store(result.path) as store:
        digest = store.metadata["checkpoint"]
    assert digest["bytes"] == sum(os.path.getsize(tmp_path / f) for f in [index.name, *shards])
    # a shard saved over since changes the digest (so that a resume refuses it)
    first = tmp_path / next(iter(shards))
    assert file_digest(str(index)).sha256 == digest["sha256"]
    changed = {k: state[k] + (k == shards[first.name][0]) for k in shards[first.name]}
    if shard_format == "safetensors":
        pytest.importorskip("safetensors.torch").save_file(changed, str(first))
    else:
        torch.save(changed, first)
    assert file_digest(str(index)).sha256 != digest["sha256"]
    # what does not fit the index is said in one line
    index.write_text(json.dumps({"weight_map": {names[0]: "gone.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"names the shards \['gone.safetensors'\], which are not beside it$"):
        read_checkpoint(str(index))
    index.write_text(json.dumps({"weight_map": {k: first.name for k in shards[first.name] + [names[1]]}}))
    with pytest.raises(CheckpointError, match=rf"^shard {re.escape(str(first))} does not hold what {index.name} says: it lacks "
                                             rf"\['{re.escape(names[1])}'\] and holds \[\] besides$"):
        read_checkpoint(str(index))
    index.write_text(json.dumps({"shards": []}))
    with pytest.raises(CheckpointError, match=r"holds no weight_map of tensor names to shard files"):
        read_checkpoint(str(index))


def test_a_folder_checkpoint_is_the_weights_save_pretrained_writes_there(tmp_path, capsys, caplog):
    """Hugging Face's folders (pytorch_model.bin, model.safetensors) and diffusers' (diffusion_
    pytorch_model.safetensors), the model's config in the config.json beside the weights, the
    library's records in it (keys named with a leading '_') left out of the builder's arguments."""
    torch.manual_seed(4)
    state = video_mar(**CONFIG).state_dict()
    folder = tmp_path / "hf"
    folder.mkdir()
    torch.save(state, folder / "pytorch_model.bin")
    loaded, key = find_state_dict(read_checkpoint(str(folder)))
    assert key == "(bare state dict)" and all(torch.equal(loaded[k], v) for k, v in state.items())
    assert file_digest(str(folder)) == file_digest(str(folder / "pytorch_model.bin"))
    result = extract(options(tmp_path, checkpoint=str(folder), num_samples=8))
    assert result.load_report["loaded"] == len(state)
    assert main(["info", str(folder)]) == 0
    assert capsys.readouterr().out.splitlines()[1] == f"  (checkpoint)  state dict of {len(state)} tensors"
    diffusers = tmp_path / "transformer"
    diffusers.mkdir()
    safetensors = pytest.importorskip("safetensors.torch")
    safetensors.save_file(state, str(diffusers / "diffusion_pytorch_model.safetensors"))
    (diffusers / "config.json").write_text(json.dumps({"_class_name": "VideoActionMAR", "_diffusers_version": "0.31.0",
                                                       **CONFIG}))
    with caplog.at_level(logging.INFO, logger="marstore.loading"):
        result = extract(options(tmp_path, checkpoint=str(diffusers), model_args={}, num_samples=8, strict=True,
                                 out=str(tmp_path / "d.h5")))
    assert (result.load_report["config_key"], result.load_report["state_key"], result.load_report["loaded"]) == (
        "config", "state_dict", len(state))
    assert (f"{diffusers / 'diffusion_pytorch_model.safetensors'}: its config is the config.json beside it "
            "(checkpoint['config'])") in caplog.messages
    assert "left out the config's keys {'_class_name': 'VideoActionMAR', '_diffusers_version': '0.31.0'}" in caplog.text
    (diffusers / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(str(diffusers / "diffusion_pytorch_model.safetensors"))
    assert str(info.value) == (f"{diffusers / 'config.json'}, beside the weights "
                               f"{diffusers / 'diffusion_pytorch_model.safetensors'}, holds a list, not the mapping of a "
                               "model's config")
    # a training run's folder of checkpoints: name one
    runs = tmp_path / "checkpoints"
    runs.mkdir()
    for name in ("latest.ckpt", "epoch=0100-train_loss=0.1.ckpt", "notes.txt"):
        (runs / name).write_bytes(b"")
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(str(runs))
    assert str(info.value) == (f"checkpoint {runs} is a folder without the weights save_pretrained writes (model.safetensors, "
                               "pytorch_model.bin, diffusion_pytorch_model.safetensors, or their index) nor a distributed "
                               "checkpoint's .metadata; name one of its checkpoints: epoch=0100-train_loss=0.1.ckpt, "
                               "latest.ckpt")


def test_a_model_module_in_the_working_directory_is_found_as_python_m_finds_it(tmp_path, monkeypatch, caplog):
    # the `marstore` command's sys.path starts at its own bin/, not at the working directory
    from marstore.loading import import_callable

    (tmp_path / "mymodel_here.py").write_text("import torch\ndef build(**kw):\n    return torch.nn.Linear(2, 2)\n")
    (tmp_path / "broken_here.py").write_text("import no_such_dependency_anywhere\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    with caplog.at_level("INFO", logger="marstore.loading"):
        assert isinstance(import_callable("mymodel_here:build", "--model")(), nn.Linear)
    assert f"--model: 'mymodel_here' is imported from the working directory {tmp_path}, which is now on sys.path" in caplog.text
    with pytest.raises(CheckpointError) as info:  # its own missing import is named, not hidden by the search
        import_callable("broken_here:build", "--model")
    assert str(info.value) == ("--model 'broken_here:build': cannot import 'broken_here' (No module named "
                               "'no_such_dependency_anywhere')")
    with pytest.raises(CheckpointError, match=r"^--model 'nowhere_here:build': cannot import 'nowhere_here' \(No module "):
        import_callable("nowhere_here:build", "--model")

class ManyKeywords(nn.Module):
    """A model class of 25 keywords, as real MAR classes take: an error names the first 20."""

    def __init__(self, k00=0, k01=0, k02=0, k03=0, k04=0, k05=0, k06=0, k07=0, k08=0, k09=0, k10=0, k11=0, k12=0,
                 k13=0, k14=0, k15=0, k16=0, k17=0, k18=0, k19=0, k20=0, k21=0, k22=0, k23=0, k24=0):
        super().__init__()


def build_many(**kwargs) -> nn.Module:
    return ManyKeywords(**kwargs)


def test_builder_errors_list_missing_and_unknown_keys():
    with pytest.raises(CheckpointError) as info:
        build_model("marstore.models.video_mar:VideoActionMAR", {"task_name": "x", "bogus": 1, "depth": 1}, config_key="model_config")
    text = str(info.value)
    assert "rejects the config from checkpoint['model_config']: it lacks ['shape_meta'] and does not accept ['bogus']" in text
    config = {"task_name": "x", "shape_meta": {"horizon": 16}}  # shape_meta["action"] is read by the constructor
    with pytest.raises(CheckpointError, match=r"^--model marstore.models:video_mar failed on the config from "
                                              r"checkpoint\['cfg.policy.model'\]: it looked up 'action', which that "
                                              r"config lacks \(its keys: \['shape_meta', 'task_name'\]\); give it with"):
        build_model("marstore.models:video_mar", config, config_key="cfg.policy.model")
    # video_mar takes **kwargs and passes them on: the class's own call rejects the key.
    with pytest.raises(CheckpointError) as info:
        build_model("marstore.models:video_mar", {"policy": {"model": {"depth": 1, "shape_meta": {}}}}, config_key="cfg")
    assert str(info.value) == (
        "--model marstore.models:video_mar rejects the config from checkpoint['cfg'] (VideoActionMAR.__init__() got an "
        "unexpected keyword argument 'policy'; its keys: ['policy']; VideoActionMAR takes decoder_depth, depth, "
        "diffusion_batch_mul, drop_masked, embed_dim, frames, grid, latent_channels, mask_ratio_min, num_heads, shape_meta, "
        "task_name, use_history_action); fix them with --model-arg KEY=VALUE or choose the config with --config-key (its "
        "sections: cfg.policy, cfg.policy.model, cfg.policy.model.shape_meta)")
    # a misspelt --model-arg: the nearest keyword the class takes
    with pytest.raises(CheckpointError, match=r"; VideoActionMAR takes decoder_depth, .*, use_history_action \(did you mean "
                                              r"'embed_dim'\?\)\); fix them"):
        build_model("marstore.models:video_mar", {}, overrides={"embed_dimm": 32})
    with pytest.raises(CheckpointError, match=r"; ManyKeywords takes k00, k01, .*, k19, \.\.\. \(25 in all\)\); fix them"):
        build_model("test_extract:build_many", {}, overrides={"other": 1})
    # an error of the builder's own code, on a value of the wrong type: where, what, and the values given
    source = inspect.getsourcefile(VideoActionMAR)
    code = next((n, line.strip()) for n, line in enumerate(open(source), 1) if "self.encoder_blocks = " in line)
    with pytest.raises(CheckpointError) as info:
        build_model("marstore.models:video_mar", {"depth": 2}, overrides={"depth": "2"})
    assert str(info.value) == (
        f"--model marstore.models:video_mar failed on the given arguments: at {source}:{code[0]} in __init__: `{code[1]}`; "
        "TypeError: 'str' object cannot be interpreted as an integer; --model-arg gave depth='2'")
    assert isinstance(info.value.__cause__, TypeError)
    with pytest.raises(CheckpointError, match="cannot import 'no_such_module'"):
        build_model("no_such_module:f", {})
    with pytest.raises(CheckpointError, match="write it as MODULE:CALLABLE"):
        build_model("marstore.models", {})


class WholeConfigNet(nn.Module):
    """Built from one config object, read both ways (research code's Net(cfg), build_model(args))."""

    def __init__(self, cfg):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(cfg.width, cfg["width"]) for _ in range(cfg.head.depth))
        self.bias = getattr(cfg, "bias", None)


def build_from_args(args, *, seed: int = 0):
    torch.manual_seed(seed)
    return WholeConfigNet(args)


def build_with_classes(num_classes):
    return nn.Linear(4, num_classes)


def build_blocks(width: int, depth: int = 2, dropout: float = 0.0):
    return nn.Sequential(*(nn.Linear(width, width) for _ in range(depth)), nn.Dropout(dropout))


def test_config_keys_that_the_builder_does_not_take_are_left_out_where_it_takes_the_others(caplog):
    """A LightningModule's hyper_parameters hold the training run's keys beside the model's."""
    report = LoadReport()
    with caplog.at_level(logging.WARNING, logger="marstore.loading"):
        model = build_model("test_extract:build_blocks", {"width": 3, "depht": 3, "lr": 1e-3, "batch_size": 32},
                            config_key="hyper_parameters", report=report)
    assert len(model) == 3 and model[0].in_features == 3  # two blocks: depht is not depth
    assert ("--model test_extract:build_blocks does not take the config's keys ['batch_size', 'depht', 'lr']: those are "
            "left out, the other 1 passed ('depht' for 'depth'? --model-arg depth=3)") in caplog.text
    assert report.notes == ["config keys that test_extract:build_blocks does not take left out: batch_size, depht, lr"]
    assert len(build_model("test_extract:build_blocks", {"width": 3, "depht": 3}, overrides={"depth": 3})) == 4
    # a --model-arg it does not take is the user's typo: refused, with the argument it may mean
    with pytest.raises(CheckpointError) as info:
        build_model("test_extract:build_blocks", {"width": 3}, overrides={"dropuot": 0.1})
    assert str(info.value) == ("--model test_extract:build_blocks rejects the given arguments: it lacks [] and does not "
                               "accept ['dropuot']; 'dropuot' for 'dropout'? --model-arg dropout=0.1; fix them with "
                               "--model-arg KEY=VALUE or choose the config with --config-key")
    # a config of none of its arguments is another model's, even where it needs none: refused
    with pytest.raises(CheckpointError, match=r"rejects the config from checkpoint\['cfg'\]: it lacks \['width'\] and "
                                              r"does not accept \['lr'\];"):
        build_model("test_extract:build_blocks", {"lr": 1e-3}, config_key="cfg")
    with pytest.raises(CheckpointError, match=r"rejects the config from checkpoint\['cfg'\]: it lacks \[\] and does not "
                                              r"accept \['lr'\];"):
        build_model("test_extract:build_optional", {"lr": 1e-3}, config_key="cfg")


def build_optional(depth: int = 2):
    return build_blocks(4, depth)


def test_a_builder_that_takes_one_config_object_gets_the_config_whole(caplog):
    report = LoadReport()
    with caplog.at_level(logging.INFO, logger="marstore.loading"):
        model = build_model("test_extract:WholeConfigNet", {"width": 3, "head": {"depth": 2}}, config_key="config",
                            overrides={"head.depth": 4}, report=report)
    assert [tuple(b.weight.shape) for b in model.blocks] == [(3, 3)] * 4 and model.bias is None
    assert report.notes == ["the config passed whole as --model's argument cfg"]
    assert ("--model test_extract:WholeConfigNet takes one argument, cfg, and none of the config from checkpoint['config']'s "
            "keys: the config goes whole as cfg (its keys read as attributes too: cfg.width)") in caplog.text
    cfg = config_object({"items": [{"depth": 1}], "width": 2})  # a dict still, for code that takes it for one
    assert cfg["items"][0].depth == 1 and json.loads(json.dumps(cfg)) == {"items": [{"depth": 1}], "width": 2}
    # MAR-style argparse arguments, to a builder with an optional keyword besides
    model = build_model("test_extract:build_from_args", to_plain(argparse.Namespace(width=2, head={"depth": 1}, lr=0.1)))
    assert len(model.blocks) == 1
    with pytest.raises(CheckpointError) as info:  # a key the builder reads and the config lacks, in one line
        build_model("test_extract:WholeConfigNet", {"width": 3}, config_key="config")
    assert str(info.value).endswith("AttributeError: the config has no key 'head' (its keys: width)")
    # a builder's one argument that is not named as a config is not given the config
    with pytest.raises(CheckpointError, match=r"rejects the given arguments: it lacks \['num_classes'\] and does not accept \['width'\]"):
        build_model("test_extract:build_with_classes", {"width": 3})


def test_a_builder_that_passes_the_config_on_gets_the_keys_its_callee_takes(tmp_path, caplog):
    """MAR's checkpoint['args'] holds the training run's arguments, and mar_base(**kwargs) passes
    them all on to MAR(...): the keys that the callee does not take are left out, said, and
    recorded in the store; the model is the one the config describes."""
    training = {"lr": 1e-4, "epochs": 400, "output_dir": "out/mar", "model": "video_mar"}
    torch.manual_seed(0)
    model = video_mar(**CONFIG)
    save_checkpoint(model, {**CONFIG, **training}, str(tmp_path / "checkpoint-last.pth"), "mar")
    save_checkpoint(model, CONFIG, str(tmp_path / "clean.pth"), "mar")
    with caplog.at_level(logging.WARNING, logger="marstore.loading"):
        result = extract(options(tmp_path, checkpoint=str(tmp_path / "checkpoint-last.pth"), model_args={}))
    assert ("--model marstore.models:video_mar passes the config on to VideoActionMAR, which does not take its keys "
            f"['epochs', 'lr', 'model', 'output_dir']: those are left out, the other {len(CONFIG)} passed on") in caplog.text
    note = "config keys that VideoActionMAR does not take left out: epochs, lr, model, output_dir"
    assert result.load_report["notes"] == [note] and extract_module.describe(result).count(note) == 1
    clean = extract(options(tmp_path, checkpoint=str(tmp_path / "clean.pth"), model_args={}, out=str(tmp_path / "clean.h5")))
    with open_store(result.path) as a, open_store(clean.path) as b:
        assert all(a.read(name).tobytes() == b.read(name).tobytes() for name in b.layers)
    # a key given with --model-arg is never left out; nor is a config of which the callee takes nothing
    with pytest.raises(CheckpointError, match=r"^--model marstore.models:video_mar rejects the config from "
                                              r"checkpoint\['args'\] \(VideoActionMAR.__init__\(\) got an unexpected "
                                              r"keyword argument 'bogus'; its keys: \['bogus', 'decoder_depth',"):
        extract(options(tmp_path, checkpoint=str(tmp_path / "checkpoint-last.pth"), model_args={"bogus": 1},
                        out=str(tmp_path / "bogus.h5")))
    with pytest.raises(CheckpointError, match=r"got an unexpected keyword argument 'lr'; its keys: \['epochs', 'lr', "
                                              r"'model', 'output_dir', 'task_name'\]; VideoActionMAR takes decoder_depth, "):
        build_model("marstore.models:video_mar", training, {"task_name": "t"}, config_key="args")


def test_dotted_model_args_reach_into_the_config():
    config = {"task_name": "t", "shape_meta": {"action": {"shape": [2]}, "horizon": 16}, "embed_dim": 32}
    model = build_model("marstore.models:video_mar", config, {"shape_meta.action.shape": [7], "depth": 1})
    assert model.action_dim == 7 and len(model.encoder_blocks) == 1
    assert config["shape_meta"]["action"]["shape"] == [2]  # the checkpoint's config is left as it was
    with pytest.raises(CheckpointError) as info:
        build_model("marstore.models:video_mar", config, {"task_name.x": 1})
    assert str(info.value) == "--model-arg task_name.x: task_name is a str, not a mapping to set a key in"


def test_hydra_keys_are_left_out_of_the_builders_arguments(caplog):
    caplog.set_level("INFO", logger="marstore.loading")
    config = {"_target_": "uva.policy.UnifiedVideoActionPolicy", "_recursive_": False, **CONFIG}
    model = build_model("marstore.models:video_mar", config, config_key="cfg.model.policy")
    assert len(model.encoder_blocks) == 2
    assert ("left out the config's keys {'_target_': 'uva.policy.UnifiedVideoActionPolicy', '_recursive_': False} (hydra's "
            "instructions and library records, named with a leading '_'): --model marstore.models:video_mar builds the "
            "model") in caplog.text
    assert config["_target_"] == "uva.policy.UnifiedVideoActionPolicy"  # the checkpoint's config is left as it was

    def takes_target(_target_, depth):
        return torch.nn.Linear(depth, 1)

    module = sys.modules[__name__]
    module.takes_target = takes_target  # a builder that names the key gets it
    assert build_model("test_extract:takes_target", {"_target_": "x", "depth": 3}).in_features == 3


def test_model_hydra_builds_the_configs_target_as_the_training_program_did(tmp_path, caplog, monkeypatch, capsys):
    """UVA's and diffusion_policy's configs name their policy's class in _target_: --model hydra
    builds it with hydra.utils.instantiate, no builder to write."""
    pytest.importorskip("hydra")
    torch.manual_seed(0)
    state = video_mar(**CONFIG).state_dict()
    path = str(tmp_path / "latest.ckpt")
    scheduler = {"_target_": "torch.nn.Identity"}
    torch.save({"cfg": {"policy": {"_target_": "marstore.models.VideoActionMAR", **CONFIG}, "scheduler": scheduler},
                "state_dicts": {"ema_model": {"model." + k: v for k, v in state.items()}}}, path)
    assert main(["info", path]) == 0  # says what --model hydra can build, and how
    assert ("  hydra _target_: cfg.policy (marstore.models.VideoActionMAR), cfg.scheduler (torch.nn.Identity); --model hydra "
            "--config-key cfg.policy builds the first") in capsys.readouterr().out.splitlines()
    with caplog.at_level(logging.INFO, logger="marstore.loading"):
        result = extract(options(tmp_path, checkpoint=path, model="hydra", config_key="cfg.policy", model_args={},
                                 strict=True, num_samples=8))
    assert ("--model hydra: marstore.models.VideoActionMAR from the config from checkpoint['cfg.policy'], built by "
            "hydra.utils.instantiate") in caplog.messages
    assert result.load_report["loaded"] == len(state) and result.rows == 8
    reference = extract(options(tmp_path, checkpoint=path, config_key="cfg.policy", model_args={}, num_samples=8,
                                out=str(tmp_path / "reference.h5")))
    with open_store(result.path) as a, open_store(reference.path) as b:
        assert all(a.read(name).tobytes() == b.read(name).tobytes() for name in b.layers)
    # the errors: no _target_ where the config is taken, an error in what it builds, no hydra
    with pytest.raises(CheckpointError) as info:
        build_model("hydra", {"policy": {"_target_": "marstore.models.VideoActionMAR"}, "scheduler": scheduler}, config_key="cfg")
    assert str(info.value) == ("--model hydra: the config from checkpoint['cfg'] has no _target_ naming what to build; choose "
                               "a section that has one with --config-key: cfg.policy (marstore.models.VideoActionMAR), "
                               "cfg.scheduler (torch.nn.Identity)")
    line = next(n for n, text in enumerate(open(inspect.getsourcefile(VideoActionMAR)), 1) if "self.encoder_blocks = " in text)
    with pytest.raises(CheckpointError) as info:
        build_model("hydra", {"_target_": "marstore.models.VideoActionMAR", **CONFIG}, {"depth": "2"}, "cfg.policy")
    assert str(info.value).startswith(f"--model hydra failed on the config from checkpoint['cfg.policy']: at "
                                      f"{inspect.getsourcefile(VideoActionMAR)}:{line} in __init__: ")
    assert str(info.value).endswith("; InstantiationException: Error in call to target 'marstore.models.video_mar."
                                    "VideoActionMAR': TypeError(\"'str' object cannot be interpreted as an integer\"); "
                                    "--model-arg gave depth='2'")
    monkeypatch.setitem(sys.modules, "hydra.utils", None)
    with pytest.raises(CheckpointError) as info:
        build_model("hydra", {"_target_": "marstore.models.VideoActionMAR", **CONFIG})
    assert str(info.value) == ("--model hydra builds the config's _target_ with hydra, which is not installed here: pip "
                               "install hydra-core")


def test_an_omegaconf_workspace_config_resolves_what_it_can(tmp_path, caplog):
    omegaconf = pytest.importorskip("omegaconf")
    # UVA's layout: hydra keys at every level, the policy's shape_meta an interpolation, and values
    # that only the training program can resolve (diffusion_policy registers ${eval:...}; hydra ${now:...})
    cfg = omegaconf.OmegaConf.create({
        "_target_": "uva.workspace.TrainUnifiedVideoActionWorkspace",
        "task": {"shape_meta": CONFIG["shape_meta"]},
        "logging": {"name": "${now:%Y.%m.%d}_uva", "steps": "${eval:'2 * 8'}", "tags": ["${missing_key}", "fixed"]},
        "checkpoint": {"dir": "???"},
        "model": {"_target_": "uva.workspace.W", "policy": {
            "_target_": "uva.policy.UnifiedVideoActionPolicy", "shape_meta": "${task.shape_meta}",
            **{k: v for k, v in CONFIG.items() if k != "shape_meta"}}}})
    torch.manual_seed(0)
    state = {"model." + k: v for k, v in video_mar(**CONFIG).state_dict().items()}
    path = str(tmp_path / "latest.ckpt")
    torch.save({"cfg": cfg, "state_dicts": {"model": state, "ema_model": state}, "pickles": {}}, path)
    for trust in (True, False):  # OmegaConf's classes are read by a safe load too
        config, key = find_config(read_checkpoint(path, trust=trust))
        assert key == "cfg"
        assert config["logging"] == {"name": "${now:%Y.%m.%d}_uva", "steps": "${eval:'2 * 8'}",
                                     "tags": ["${missing_key}", "fixed"]}
        assert config["checkpoint"] == {"dir": "???"} and config["model"]["policy"]["shape_meta"] == CONFIG["shape_meta"]
        warning = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"][-1]
        assert warning.startswith("the config keeps 4 values unresolved, as written: cfg.logging.name = '${now:%Y.%m.%d}_uva' "
                                  "(it calls resolver 'now', which is not run on a checkpoint's config); ")
        assert "cfg.logging.tags.0 = '${missing_key}'" in warning and "cfg.checkpoint.dir = '???'" in warning
    caplog.clear()
    result = extract(options(tmp_path, checkpoint=path, config_key="cfg.model.policy", model_args={}))
    assert "unresolved" not in caplog.text  # the policy's section resolves whole
    with open_store(result.path) as s:
        assert s.metadata["model_config"]["shape_meta"] == CONFIG["shape_meta"]
        assert result.load_report["missing_count"] == result.load_report["unexpected_count"] == 0

def test_a_checkpoints_config_runs_no_resolver_but_omegaconfs_own(monkeypatch, caplog):
    """diffusion_policy registers Python's eval as ${eval:...}: a checkpoint's config must not
    run it (nor any resolver the importing code registered), nor copy the environment into the
    store's record of the config; OmegaConf's own resolvers and references still resolve."""
    omegaconf = pytest.importorskip("omegaconf")
    calls = []
    with warnings.catch_warnings():  # omegaconf 2.4 renames register_new_resolver
        warnings.simplefilter("ignore", UserWarning)
        omegaconf.OmegaConf.register_new_resolver("eval", lambda text: calls.append(text) or 16, replace=True)
    monkeypatch.setenv("MARSTORE_TEST_SECRET", "hunter2")
    try:
        cfg = omegaconf.OmegaConf.create({"steps": "${eval:'2 * 8'}", "again": "${steps}", "key": "${oc.env:MARSTORE_TEST_SECRET}",
                                          "depth": 2, "name": "d${oc.select:depth,0}", "nested": {"d": "${depth}"}})
        assert to_plain(cfg, "cfg") == {"steps": "${eval:'2 * 8'}", "again": "${eval:'2 * 8'}",
                                        "key": "${oc.env:MARSTORE_TEST_SECRET}", "depth": 2, "name": "d2", "nested": {"d": 2}}
    finally:
        omegaconf.OmegaConf.clear_resolver("eval")
    assert calls == [] and "hunter2" not in caplog.text
    assert "cfg.key = '${oc.env:MARSTORE_TEST_SECRET}' (it calls resolver 'oc.env', which is not run on" in caplog.text


def test_a_workspace_saved_with_dill_loads_safely(tmp_path):
    """diffusion_policy and UVA save their workspaces with pickle_module=dill, which names builtin
    types by its own function (dill._dill._load_type): a safe load reads them, and nothing else of dill's."""
    dill = pytest.importorskip("dill")
    omegaconf = pytest.importorskip("omegaconf")
    torch.manual_seed(0)
    model = video_mar(**CONFIG)
    state = {"model." + k: v for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters())
    cfg = omegaconf.OmegaConf.create({"policy": {"model": CONFIG}, "name": "uva"})
    path = str(tmp_path / "latest.ckpt")
    torch.save({"cfg": cfg, "state_dicts": {"model": state, "ema_model": state, "optimizer": optimizer.state_dict()},
                "pickles": {"_output_dir": dill.dumps("/data/outputs/uva")}}, path, pickle_module=dill)
    assert "dill._dill._load_type" in torch.serialization.get_unsafe_globals_in_checkpoint(path)
    ckpt = read_checkpoint(path)
    assert find_config(ckpt, "cfg.policy.model") == (CONFIG, "cfg.policy.model")
    assert all(torch.equal(ckpt["state_dicts"]["ema_model"][k], v) for k, v in state.items())
    # a function of dill's that makes more than a builtin type stays refused
    torch.save({"f": dill.dumps(len), "g": len.__call__}, str(tmp_path / "code.ckpt"), pickle_module=dill)
    with pytest.raises(CheckpointError, match=r"code\.ckpt needs unpickling of .*, which a safe load refuses; if you "
                                              r"trust its source, pass --trust-checkpoint$"):
        read_checkpoint(str(tmp_path / "code.ckpt"))


def test_a_checkpoint_is_read_without_its_optimizer_state_in_memory(tmp_path):
    """A training checkpoint holds the optimizer's moments beside the weights (twice their size
    with AdamW): its tensors are mapped, so only the weights used are read into memory. A file of
    torch's legacy format is read whole, as before."""
    moments = {i: {"exp_avg": torch.ones(1 << 20), "exp_avg_sq": torch.ones(1 << 20)} for i in range(24)}  # 192 MiB
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": {"w": torch.full((1 << 18,), 2.0)}, "optimizer": {"state": moments}}, path)
    # the peak of this process's own memory (VmHWM: ru_maxrss keeps the parent's across fork and exec)
    code = ("import re, sys, torch\n"
            "from marstore.loading import find_state_dict, read_checkpoint\n"
            "peak = lambda: int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
            "before = peak()\n"
            "state, key = find_state_dict(read_checkpoint(sys.argv[1]))\n"
            "assert key == 'model' and float(state['w'].sum()) == 2.0 * (1 << 18)\n"
            "print((peak() - before) // 1024)")
    grown = int(subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True).stdout)
    assert grown < 48  # MiB: the weights (1 MiB), not the 192 MiB of moments
    torch.save({"model": {"w": torch.full((4,), 2.0)}}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    assert read_checkpoint(str(tmp_path / "legacy.pth"))["model"]["w"].tolist() == [2.0] * 4


class NotAConfig:
    """A class that a safe load must not unpickle."""


def test_a_distributed_checkpoint_folder_is_read_safely_without_its_optimizer_state(tmp_path, caplog, capsys):
    """FSDP's and torchtitan's checkpoints are folders that torch.distributed.checkpoint writes
    (.metadata and __R_N.distcp files): read in this process, as torch's dcp_to_torch_save
    does, but with its pickles read as a safe torch.load reads (torch's reader unpickles them
    whole) and the optimizer's moments never read. The folder was refused as one without weights."""
    torch.manual_seed(0)
    model = video_mar(**CONFIG)
    folder = str(tmp_path / "step-3")
    save_checkpoint(model, CONFIG, folder, "fsdp")
    with caplog.at_level(logging.INFO, logger="marstore.loading"):
        result = extract(options(tmp_path, checkpoint=folder, model_args={}, num_samples=8, strict=True))
    assert f"checkpoint {folder}: optimizer not read (training state, no weights of the model)" in caplog.messages
    assert f"{folder}: a torch.distributed.checkpoint folder of 1 data file, read in this process" in caplog.messages
    files = [os.path.join(folder, ".metadata"), os.path.join(folder, "__0_0.distcp")]
    digest = hashlib.sha256(b"".join(open(f, "rb").read() for f in files)).hexdigest()
    assert result.load_report["checkpoint"] == {"path": folder, "bytes": sum(map(os.path.getsize, files)), "sha256": digest}
    assert (result.load_report["config_key"], result.load_report["state_key"], result.load_report["loaded"]) == (
        "model_config", "model", len(model.state_dict()))
    assert sorted(read_checkpoint(folder)) == ["model", "model_config", "step"]  # the optimizer's moments: not read
    assert main(["info", folder]) == 0
    assert capsys.readouterr().out.splitlines()[1:4] == [
        f"  model         state dict of {len(model.state_dict())} tensors",
        f"  model_config  mapping of {len(CONFIG)}: {', '.join(CONFIG)}", "  step          3"]
    # a value of a class a safe load refuses: named, with the flag that allows it
    import torch.distributed.checkpoint as dcp
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": model.state_dict(), "extra": NotAConfig()}, checkpoint_id=str(tmp_path / "odd"))
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(str(tmp_path / "odd"))
    assert str(info.value) == (f"checkpoint {tmp_path / 'odd'}: its value 'extra' needs unpickling of test_extract.NotAConfig, "
                               "which a safe load refuses; if you trust its source, pass --trust-checkpoint")
    assert isinstance(read_checkpoint(str(tmp_path / "odd"), trust=True)["extra"], NotAConfig)
    # its metadata, a pickle too, runs no code of the file's
    with open(tmp_path / "odd" / ".metadata", "wb") as f:
        pickle.dump(NotAConfig(), f)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(str(tmp_path / "odd"))
    assert str(info.value) == (f"checkpoint {tmp_path / 'odd'}: its .metadata needs unpickling of test_extract.NotAConfig, "
                               "which a safe load refuses; if you trust its source, pass --trust-checkpoint")


def test_info_describes_a_checkpoint_before_any_builder_is_written(tmp_path, capsys):
    """`marstore info CKPT`: its entries, the config and the weights a run would take, and the
    modules those weights belong to, each a name --layers takes."""
    torch.manual_seed(0)
    model = video_mar(**CONFIG)
    path = str(tmp_path / "latest.ckpt")
    save_checkpoint(model, CONFIG, path, "workspace")
    assert main(["info", path]) == 0
    lines = capsys.readouterr().out.splitlines()
    state = model.state_dict()
    total = sum(v.numel() for v in state.values()) + 2 * 2 + 3  # with the layout's vae_model and normalizer tensors
    assert lines[:5] == [
        f"{path}: a checkpoint ({human_bytes(os.path.getsize(path))}), read with weights_only=True",
        "  cfg          mapping of 1: policy",
        "  state_dicts  mapping of 4: model, ema_model, optimizer, lr_scheduler",
        "  pickles      mapping of 0",
        "config: checkpoint['cfg'], 1 key; sections: cfg.policy, cfg.policy.model, cfg.policy.model.shape_meta "
        "(--config-key chooses another)"]
    assert lines[5].split() == ["weights", "run", "tensors", "values", "bytes", "dtypes", "prefix"]
    for line, key, run in ((lines[6], "state_dicts.ema_model", ["EMA,", "loaded"]), (lines[7], "state_dicts.model", ["-"])):
        assert line.split() == [key, *run, str(len(state) + 2), f"{total:,}", *human_bytes(4 * total).split(), "float32",
                                "'model.'"]
    assert lines[8] == ("modules of state_dicts.ema_model, 'model.' stripped, which --layers names (each with the modules "
                        "inside it):")
    assert main(["info", path, "--json"]) == 0
    modules = json.loads(capsys.readouterr().out)["modules"]
    assert [m["name"] for m in modules] == [
        "(its own tensors)", "z_proj", "z_proj_cond", "action_proj", "proj_cond_x_layer", "encoder_blocks.0-1", "encoder_norm",
        "decoder_embed", "decoder_blocks.0-1", "decoder_norm", "diffloss.net.res_blocks.0-1", "diffloss", "diffactloss"]
    assert sum(m["tensors"] for m in modules) == len(state) and sum(m["values"] for m in modules) == sum(
        v.numel() for v in state.values())
    for m in modules[1:]:  # each a module of the model, as --layers names it
        model.get_submodule(m["name"].split("-")[0])
    # MAR's layout: its argparse arguments as the config, the EMA weights loaded
    save_checkpoint(model, {**CONFIG, "lr": 1e-4}, str(tmp_path / "mar.pth"), "mar")
    assert main(["info", str(tmp_path / "mar.pth"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["values"] == {**CONFIG, "lr": 1e-4}  # what --model gets
    assert main(["info", str(tmp_path / "mar.pth")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[7:9] == ["config: checkpoint['args'], 7 keys; sections: args.shape_meta, args.shape_meta.action "
                        "(--config-key chooses another)", "  task_name='t', embed_dim=32, depth=2, decoder_depth=2, "
                        "num_heads=2, lr=0.0001"]
    assert [line.split()[:3] for line in out[10:12]] == [["model_ema", "EMA,", "loaded"], ["model", "-", str(len(state))]]
    # a checkpoint of classes a safe load refuses: one line, and --trust-checkpoint describes it
    torch.save({"state_dict": state, "hparams": TrainConfig()}, tmp_path / "pickled.pt")
    assert main(["info", str(tmp_path / "pickled.pt")]) == 2
    assert capsys.readouterr().err.startswith(f"marstore info: checkpoint {tmp_path / 'pickled.pt'} needs unpickling of "
                                              "test_extract.TrainConfig")
    assert main(["info", str(tmp_path / "pickled.pt"), "--trust-checkpoint"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:4] == [f"{tmp_path / 'pickled.pt'}: a checkpoint ({human_bytes(os.path.getsize(tmp_path / 'pickled.pt'))}), "
                       "read with full unpickling (--trust-checkpoint)",
                       f"  state_dict  state dict of {len(state)} tensors", "  hparams     TrainConfig(depth=2)",
                       "config: checkpoint['hparams'] is a TrainConfig, not a config mapping"]
    # EMA weights beside the model's in one state dict: the copy a run takes, and how to take the other
    save_checkpoint(model, CONFIG, str(tmp_path / "ema.ckpt"), "lightning_ema")
    assert main(["info", str(tmp_path / "ema.ckpt")]) == 0
    out = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(out) if line.startswith("state_dict "))
    assert out[at].split()[-1] == "'model_ema.module.'" and out[at + 1:at + 3] == [
        "state_dict holds its weights twice, under 'model.' and, as EMA weights, under 'model_ema.module.': a model "
        "named as one copy gets the EMA ones (--state-key state_dict.model the others)",
        "modules of state_dict, 'model_ema.module.' stripped, which --layers names (each with the modules inside it):"]
    assert main(["info", str(tmp_path / "ema.ckpt"), "--json"]) == 0
    assert [m["name"] for m in json.loads(capsys.readouterr().out)["modules"]] == [m["name"] for m in modules]


class TrainConfig:
    """A training program's own config class, which only a trusted load reads."""

    depth = 2

    def __repr__(self) -> str:
        return f"TrainConfig(depth={self.depth})"


def test_config_key_and_state_key_errors(tmp_path):
    path = str(tmp_path / "c.pt")
    save_checkpoint(video_mar(**CONFIG), CONFIG, path, "workspace")
    ckpt = read_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"config key 'cfg.model': 'model' is not in the checkpoint"):
        find_config(ckpt, "cfg.model")
    state, key = find_state_dict(ckpt, "state_dicts.model")
    assert key == "state_dicts.model"
    with pytest.raises(CheckpointError, match=r"--state-key 'ema' is not in the checkpoint; weights found under: \['state_dicts.ema_model', 'state_dicts.model'\]"):
        find_state_dict(ckpt, "ema")


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.pair = PairOut()
        self.named = DictOut()
        self.head = nn.Linear(4, 2)
        self.loop = nn.Linear(4, 4)
        self.never = nn.Linear(4, 4)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.ReLU()) for _ in range(2))

    def forward(self, x, steps=1):
        h = self.a(x)
        h, _ = self.pair(h)
        h = self.named(h)["hidden"]
        for _ in range(steps):
            h = self.loop(h)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


class PairOut(nn.Module):
    def forward(self, x):
        return x * 2, x * 3


class DictOut(nn.Module):
    def forward(self, x):
        return {"hidden": x + 1, "other": x - 1}


def captured(model, patterns, x, **kw):
    with hooks.Capture(model, hooks.parse_layers(patterns, model), **kw) as cap:
        cap.start_batch()
        model(x, **kw.pop("call", {})) if False else model(x)
        return cap.finish_batch()


def test_tuple_dict_and_input_captures():
    torch.manual_seed(0)
    model, x = Toy(), torch.randn(3, 4)
    out = captured(model, ["pair:1", "named:hidden", "head@input", "a"], x)
    h = model.a(x)
    assert torch.equal(out["a"], h)
    assert torch.equal(out["pair:1"], h * 3)
    assert torch.equal(out["named:hidden"], h * 2 + 1)
    assert set(out) == {"a", "pair:1", "named:hidden", "head@input"}
    with pytest.raises(hooks.HookError, match=r"pair returns a tuple of 2; pick one with 'pair:0'"):
        captured(model, ["pair"], x)
    with pytest.raises(hooks.HookError) as info:
        captured(model, ["named:nope"], x)
    assert str(info.value) == "named:nope: the output of named is a dict with no element 'nope'; it has keys ['hidden', 'other']"
    with pytest.raises(hooks.HookError) as info:
        captured(model, ["pair:2"], x)
    assert str(info.value) == "pair:2: the output of pair is a tuple with no element 2; it has elements 0 to 1"
    with pytest.raises(hooks.HookError) as info:
        hooks.parse_layers(["head@inputs"], model)
    assert str(info.value) == "layer pattern 'head@inputs': unknown capture '@inputs'; use @input or @output"


Hidden = collections.namedtuple("Hidden", "hidden attn")


@dataclasses.dataclass
class BlockOutput:
    hidden: torch.Tensor
    attn: torch.Tensor | None = None


class TupleOf(nn.Module):
    def forward(self, x):
        return Hidden(x, x * 2)


class RecordOf(nn.Module):
    def __init__(self, attn: bool = True):
        super().__init__()
        self.attn = attn

    def forward(self, x):
        return BlockOutput(x + 1, x - 1 if self.attn else None)


class Holder(nn.Module):
    def __init__(self, m: nn.Module):
        super().__init__()
        self.m = m

    def forward(self, x):
        self.m(x)
        return x


def test_a_namedtuple_or_dataclass_output_gives_its_fields_by_name():
    x = torch.randn(3, 4)
    tupled = captured(Holder(TupleOf()), ["m:attn", "m:1", "m:hidden"], x)
    assert torch.equal(tupled["m:attn"], x * 2) and torch.equal(tupled["m:1"], x * 2) and torch.equal(tupled["m:hidden"], x)
    out = captured(Holder(RecordOf()), ["m:hidden", "m:attn"], x)
    assert torch.equal(out["m:hidden"], x + 1) and torch.equal(out["m:attn"], x - 1)
    for module, name in ((TupleOf(), "Hidden"), (RecordOf(), "BlockOutput")):
        with pytest.raises(hooks.HookError) as info:
            captured(Holder(module), ["m"], x)
        assert str(info.value) == f"m returns a {name} with fields hidden, attn; pick one with 'm:hidden'"
        with pytest.raises(hooks.HookError) as info:
            captured(Holder(module), ["m:logits"], x)
        assert str(info.value) == f"m:logits: the output of m is a {name} with no element 'logits'; it has fields hidden, attn"
    with pytest.raises(hooks.HookError) as info:  # a dataclass has no order to index
        captured(Holder(RecordOf()), ["m:0"], x)
    assert str(info.value) == "m:0: the output of m is a BlockOutput with no element 0; it has fields hidden, attn"
    with pytest.raises(hooks.HookError) as info:
        captured(Holder(RecordOf(attn=False)), ["m:attn"], x)
    assert str(info.value) == "m:attn: the output of m:attn is a NoneType, not a tensor; pick a tensor element with ':index' or ':key'"


class Gate(nn.Module):
    def forward(self, x, scale, **extra):
        return x * scale + extra.get("shift", 0)


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = Gate()

    def forward(self, x):
        return self.gate(x, scale=x.sum(-1, keepdim=True), shift=x + 5)


def test_an_input_is_picked_by_its_argument_name_and_a_tensor_has_no_elements():
    model, x = Gated(), torch.randn(3, 4)
    out = captured(model, ["gate@input:scale", "gate@input:shift", "gate@input:x", "gate@input:1"], x)
    assert torch.equal(out["gate@input:scale"], x.sum(-1, keepdim=True)) and torch.equal(out["gate@input:shift"], x + 5)
    assert torch.equal(out["gate@input:x"], x) and torch.equal(out["gate@input:1"], x.sum(-1, keepdim=True))
    with pytest.raises(hooks.HookError) as info:
        captured(model, ["gate@input:bias"], x)
    assert str(info.value) == "gate@input:bias: gate was called without an argument 'bias'; its arguments: ['x', 'scale', 'shift']"
    # ':0' on a tensor used to store each batch's first sample as if it were the batch
    for pattern, element in (("gate:0", "0"), ("gate:hidden", "hidden")):
        with pytest.raises(hooks.HookError) as info:
            captured(model, [pattern], x)
        assert str(info.value) == (f"{pattern}: the output of gate is a tensor, and ':{element}' picks an element of a tuple, "
                                   "list or dict; hook gate without it (--reduction picks tokens)")


def test_a_pattern_that_is_no_regular_expression_is_refused_in_one_line(tmp_path):
    with pytest.raises(hooks.HookError) as info:
        hooks.parse_layers(["re:blocks\\.["], Toy())
    assert str(info.value) == "layer pattern 're:blocks\\\\.[': not a regular expression (unterminated character set at position 8)"
    from marstore.dataset import layers_of
    from marstore.store import StoreError

    result = extract(options(tmp_path, dataset_args={"size": 8}))
    with open_store(result.path) as s, pytest.raises(StoreError, match=r"^layer pattern 're:enc\[': not a regular expression"):
        layers_of(s, "re:enc[")

def test_glob_levels_and_regex():
    model = Toy()
    names = [s.name for s in hooks.parse_layers(["blocks.*"], model)]
    assert names == ["blocks.0", "blocks.1"]  # the blocks, not their sub-modules
    assert [s.name for s in hooks.parse_layers(["blocks.**"], model)] == ["blocks.0", "blocks.0.0", "blocks.0.1", "blocks.1", "blocks.1.0", "blocks.1.1"]
    assert [s.name for s in hooks.parse_layers(["re:blocks\\.\\d\\.0"], model)] == ["blocks.0.0", "blocks.1.0"]
    assert [s.name for s in hooks.parse_layers(["re:(?:pair|named)"], model)] == ["pair", "named"]
    assert [(s.name, s.element) for s in hooks.parse_layers(["re:(?:pair):1"], model)] == [("pair", 1)]


def test_excluded_modules_leave_what_the_patterns_select(tmp_path):
    model = Toy()
    kept = hooks.parse_layers(["**"], model, exclude=["blocks.**", "re:pair|named"])
    assert [s.name for s in kept] == ["a", "head", "loop", "never"]
    with pytest.raises(hooks.HookError) as info:  # a typo would exclude nothing, without a word
        hooks.parse_layers(["blocks.*"], model, exclude=["blocks.*.0"])
    assert str(info.value) == "--exclude-layers 'blocks.*.0' matches none of the selected modules; nearest: ['blocks.0']"
    with pytest.raises(hooks.HookError) as info:
        hooks.parse_layers(["blocks.*"], model, exclude=["blocks.1", "blocks.0"])
    assert str(info.value) == "--exclude-layers blocks.1 blocks.0 leaves out every module that --layers selects"
    # the built-in model's every module but its attention, whose (output, weights) tuple has no one tensor to store
    # and whose out_proj never fires (nn.MultiheadAttention uses its weights, not its forward)
    result = extract(options(tmp_path, layers=["encoder_blocks.**"], exclude_layers=["**.attn", "**.attn.**"],
                             num_samples=8))
    with open_store(result.path) as s:
        assert not [n for n in s.layers if ".attn" in n] and "encoder_blocks.0.mlp" in s.layers
        assert s.metadata["options"]["exclude_layers"] == ["**.attn", "**.attn.**"]


def test_a_dry_run_says_what_every_layer_gives_and_all_that_stands_in_the_way(tmp_path, capsys):
    from marstore.extract import Survey

    survey = extract(options(tmp_path, layers=["**"], reduction="mean", dry_run=True))  # two batches, as the run decides from
    assert isinstance(survey, Survey) and survey.rows == 16 and os.listdir(tmp_path) == []  # nothing written
    by = {s.name: s for s in survey.layers}
    assert len(by) == 58
    block = by["encoder_blocks.0"]
    assert (block.module, block.calls, block.gave, block.row, block.source_dtype, block.problem) == (
        "Block", 1, "Tensor(8, 64, 32) float32", (32,), "float32", None)
    attn = by["encoder_blocks.0.attn"]
    assert attn.gave == "tuple(Tensor(8, 64, 32) float32, None)" and attn.row is None
    assert attn.problem == "encoder_blocks.0.attn returns a tuple of 2; pick one with 'encoder_blocks.0.attn:0' (or another index)"
    conv = by["diffactloss.conv"]  # refused before the forward, still hooked to show what it gives
    assert (conv.calls, conv.gave) == (1, "Tensor(32, 32, 4, 4) float32")
    assert conv.problem.startswith("diffactloss.conv is a Conv2d, whose output is (batch, channels, ...)")
    assert by["diffactloss.refine"].problem == (
        "diffactloss.refine: reduction 'mean' needs (batch, tokens, features) activations, got shape (8, 512); leave it "
        "out of --layers, or store it whole: --layer-reduction diffactloss.refine=none")
    assert by["diffloss"].calls == 0 and by["diffloss"].problem == (
        "diffloss did not fire (some modules run only in some task modes, or in sampling): run it with another --forward, "
        "or leave it out (--allow-missing covers batches after the first)")
    assert by["encoder_blocks.0.attn.out_proj"].problem == (
        "encoder_blocks.0.attn.out_proj never fires: its nn.MultiheadAttention (encoder_blocks.0.attn) uses its weights "
        "without calling it; hook 'encoder_blocks.0.attn:0' for the attention's output")
    with pytest.raises(hooks.HookError, match=r"^decoder_blocks.1.attn.out_proj never fires: its nn.MultiheadAttention "):
        extract(options(tmp_path, layers=["decoder_blocks.1.attn.out_proj"]))  # the run says it too
    text = survey.describe().splitlines()
    assert "22 of 58 layers would stop the extraction; each problem says what fixes it:" in text
    assert "    and the same for 3 more: encoder_blocks.1.attn.out_proj, decoder_blocks.0.attn.out_proj, " \
           "decoder_blocks.1.attn.out_proj" in text
    assert "    and the same for 3 more: encoder_blocks.1.attn, decoder_blocks.0.attn, decoder_blocks.1.attn" in text
    assert text[-3] == ("or leave them out: --exclude-layers action_proj 'encoder_blocks.*.attn' "
                        "'encoder_blocks.*.attn.out_proj' 'decoder_blocks.*.attn' 'decoder_blocks.*.attn.out_proj' diffloss "
                        "'diffloss.**' diffactloss.conv diffactloss.fc diffactloss.refine")
    # which leave out exactly the layers that would stop the run
    kept = extract(options(tmp_path, layers=["**"], reduction="mean", dry_run=True,
                           exclude_layers=shlex.split(text[-3].split("--exclude-layers ")[1])))
    assert kept.problems() == [] and {s.name for s in kept.layers} == {s.name for s in survey.layers if not s.problem}
    assert re.fullmatch(r"and about \d+\.\d s of forward passes, at the pace of the surveyed batches after the first "
                        r"\([\d,]+ rows/s; storing the rows adds to it\)", text[-1]) and len(survey.seconds) == 2
    # the fixes it names, taken: every layer passes, and the extraction stores the rows it said
    fixed = dict(layers=["encoder_blocks.*", "**.attn:0", "diffactloss.*"], reduction="mean", unfold_batch=True,
                 channels_first=["diffactloss.conv"], layer_reductions={"diffactloss.refine": "none"})
    survey = extract(options(tmp_path, dry_run=True, **fixed))
    result = extract(options(tmp_path, **fixed))
    again = extract(options(tmp_path, dry_run=True, **fixed))  # with the same --out, which exists now
    assert again.layers == survey.layers and again.problems() == [
        f"{result.path} exists: pass --resume to continue it (with the options it was written with), or choose another --out"]
    with open_store(result.path) as s:
        assert {n: layer.row_shape for n, layer in s.layers.items()} == {x.name: x.row for x in survey.layers}
        assert survey.row_bytes() == sum(math.prod(layer.row_shape) * 2 for layer in s.layers.values()) == 1540
    assert survey.describe().splitlines()[-3:-1] == [
        "all 10 layers would be stored", "the run's 40 rows: about 60.2 KiB of activations (1.5 KiB a row, as the surveyed "
        "batches' shapes give it)"]

    config = tmp_path / "run.json"
    config.write_text(json.dumps({"model_args": CONFIG}))
    assert main(["extract", "--config", str(config), "--model", "marstore.models:video_mar", "--dataset",
                 "marstore.models:synthetic_video_actions", "--forward", "marstore.models:policy_forward",
                 "--layers", "encoder_blocks.*", "diffactloss.fc", "--batch-size", "4", "--dry-run"]) == 1
    printed = capsys.readouterr().out.splitlines()
    assert printed[:2] == ["dry run: the first 2 batches (8 samples) through the model, every selected layer hooked; nothing "
                           "written", "weights: none loaded (no checkpoint): the model runs with the weights it has"]
    assert printed[-3] == "or leave them out: --exclude-layers diffactloss.fc"
    # with a checkpoint: what loading its weights found, as the run would report it
    path = tmp_path / "latest.ckpt"
    torch.manual_seed(0)
    save_checkpoint(video_mar(**CONFIG), CONFIG, str(path), "workspace")
    survey = extract(options(tmp_path, checkpoint=str(path), config_key="cfg.policy.model", model_args={}, dry_run=True))
    assert survey.describe().splitlines()[1] == (f"weights: state_dicts.ema_model of {path}: loaded 82 tensors (prefix "
                                                 "'model.' stripped), 0 missing, 0 unexpected, 0 shape mismatches")


def test_a_dry_run_surveys_two_batches_as_the_run_decides_from_them(tmp_path):
    """The run stores a layer ragged when its first two batches give other token counts, and
    checks the model's state on its second batch: --dry-run alone surveys two batches, so that
    it says the same (MAR's masked encoder); --dry-run 1 surveys one."""
    kw = dict(layers=["encoder_blocks.1", "random_masking()"], model_args={**CONFIG, "drop_masked": True})
    survey = extract(options(tmp_path, dry_run=True, **kw))
    assert (survey.batches, survey.rows, survey.state_changes) == (2, 16, [])
    encoder = survey.layers[0]
    assert encoder.tokens is not None and encoder.tokens[0] < encoder.tokens[1] and encoder.row == (32,)
    assert survey.layers[1].row == (64,) and survey.layers[1].tokens is None
    result = extract(options(tmp_path, **kw))
    with open_store(result.path) as s:
        assert s.layers["encoder_blocks.1"].layout == "ragged"
    one = extract(options(tmp_path, dry_run=1, **kw))
    assert (one.batches, one.state_changes) == (1, None) and one.layers[0].tokens is None
    small = extract(options(tmp_path, dry_run=True, dataset_args={"size": 5}, **kw))
    assert survey.describe().splitlines()[0].startswith("dry run: the first 2 batches (16 samples) through the model")
    assert small.describe().splitlines()[0].startswith("dry run: the data set's one batch (5 samples; 2 asked) through")


def forward_x(model, batch):
    return model(batch["x"])


def test_a_forward_that_fails_on_the_data_is_a_dry_run_finding_and_a_note_on_the_runs_error(tmp_path):
    """A batch that does not fit the model (5 features for 4) stopped the dry run with torch's
    traceback, and the run with one that did not say on which items."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(5, 3))
    data = [{"x": torch.zeros(4 if i < 8 else 5), "label": i} for i in range(12)]
    line = inspect.getsourcelines(forward_x)[1] + 1
    failed = (f"the forward failed on the batch of items {{}} to {{}} (x Tensor(4, {{}}) float32, label Tensor(4,) int64): at "
              f"{__file__}:{line} in forward_x: `return model(batch[\"x\"])`; RuntimeError: mat1 and mat2 shapes cannot be "
              "multiplied (4x{} and 5x3)")
    survey = extract_from(model, data, "", ["0", "1", "2"], forward=forward_x, targets=["label"], batch_size=4,
                          progress=False, dry_run=True)
    assert survey.problems() == [failed.format(0, 3, 4, 4)]
    assert [(s.name, s.calls, s.gave, s.row) for s in survey.layers] == [
        ("0", 1, "Tensor(4, 4) float32", (4,)), ("1", 1, "Tensor(4, 4) float32", (4,)), ("2", 0, "- (not reached)", None)]
    text = survey.describe()
    assert "the forward's return: none (the forward failed: below)" in text
    assert text.endswith(f"the run would stop at:\n  {failed.format(0, 3, 4, 4)}\n\n2 of 3 layers fired before the forward failed")
    # the run stores what fits the model, and its error says where it stopped
    model[2] = nn.Linear(4, 3)
    survey = extract_from(model, data, "", ["0", "2"], forward=forward_x, batch_size=4, progress=False, dry_run=3)
    assert survey.problems() == ["in batch 3: " + failed.format(8, 11, 5, 5).replace("5x3", "4x4")]
    assert [s.row for s in survey.layers] == [(4,), (3,)] and survey.batches == 2
    with pytest.raises(RuntimeError) as info:
        extract_from(model, data, str(tmp_path / "s.h5"), ["0", "2"], forward=forward_x, batch_size=4, commit_rows=4,
                     progress=False)
    assert info.value.__notes__ == ["marstore: " + failed.format(8, 11, 5, 5).replace("5x3", "4x4")]
    with open_store(str(tmp_path / "s.h5")) as s:
        assert s.rows == 8
    with pytest.raises(RuntimeError) as info:
        extract_from(model, data[8:], str(tmp_path / "t.h5"), ["0"], forward=forward_x, batch_size=4, progress=False)
    assert info.value.__notes__ == ["marstore: " + failed.format(0, 3, 5, 5).replace("5x3", "4x4") +
                                    "; --dry-run shows what each hooked layer gave before it"]

    def asserting(model, batch):  # a bare assert's error, no message: it was an IndexError of marstore's own
        raise AssertionError
    with pytest.raises(AssertionError) as info:
        extract_from(model, data, str(tmp_path / "u.h5"), ["0"], forward=asserting, batch_size=4, progress=False)
    assert info.value.__notes__ == [
        f"marstore: the forward failed on the batch of items 0 to 3 (x Tensor(4, 4) float32, label Tensor(4,) int64): at "
        f"{__file__}:{asserting.__code__.co_firstlineno + 1} in asserting: `raise AssertionError`; AssertionError; "
        "--dry-run shows what each hooked layer gave before it"]


def test_the_patterns_a_dry_run_suggests_name_the_bad_layers_and_no_other():
    from marstore.extract import _covering

    names = ["a.0", "a.0.x", "a.1", "a.1.x", "b", "b.c", "d", "d.e", "d.e.f", "pair:0", "pair:1"]
    assert _covering(["a.0.x", "a.1.x", "b", "d", "d.e", "d.e.f", "pair:1"], names) == ["a.*.x", "b", "d", "d.**"]
    assert _covering(["a.1.x"], names) == ["a.1.x"]  # one of its kind: by name
    assert _covering(["pair:0", "pair:1"], names) == ["pair"]  # a module hooked twice, both bad


def test_a_surveyed_forward_counts_firings_and_goes_on_past_each_error():
    model, x = Toy(), torch.randn(3, 4)
    with hooks.Capture(model, hooks.parse_layers(["loop", "never", "pair", "head"], model), survey=True) as capture:
        capture.start_batch(3)
        model(x, steps=3)
        found = {s.name: s for s in capture.survey_batch()}
    assert [(s.calls, s.row) for s in found.values()] == [(3, None), (0, None), (1, None), (1, (2,))]
    assert found["loop"].problem == ("loop fired more than once in one forward (diffusion heads fire once per step); "
                                     "choose --multi-fire first, last or stack")
    assert found["pair"].gave == "tuple(Tensor(3, 4) float32, Tensor(3, 4) float32)" and found["head"].problem is None
    assert hooks.hook_count(model) == 0


def test_unknown_layer_suggests_nearest_names():
    with pytest.raises(hooks.HookError) as info:
        hooks.parse_layers(["encoder_block.3"], video_mar(**CONFIG))
    # the model has blocks 0 and 1: no component fix makes a name; the nearest in the model's order
    assert str(info.value) == ("layer pattern 'encoder_block.3' matches no module; nearest names: ['encoder_blocks.0', "
                               "'encoder_blocks.1', 'encoder_blocks', 'decoder_blocks.0', 'decoder_blocks.1']")
    with pytest.raises(hooks.HookError) as info:  # a glob's misspelt components: the glob they make is offered
        hooks.parse_layers(["decodr_blocks.**.atn"], video_mar(**CONFIG))
    assert str(info.value).startswith("layer pattern 'decodr_blocks.**.atn' matches no module; did you mean "
                                      "'decoder_blocks.**.attn' (it matches 2)? nearest names: [")
    with pytest.raises(hooks.HookError) as info:  # a glob's misspelt end: the names that end as it nearly does
        hooks.parse_layers(["encoder_blocks.*.atn"], video_mar(**CONFIG))
    assert str(info.value).endswith("nearest names: ['encoder_blocks.0.attn', 'encoder_blocks.1.attn', "
                                    "'decoder_blocks.0.attn', 'decoder_blocks.1.attn']")
    # names copied from the policy or workspace that wraps the model: the prefix to drop is named
    for pattern, prefix, rest, count in (("model.encoder_blocks.*", "model.", "encoder_blocks.*", 2),
                                         ("policy.model.z_proj", "policy.model.", "z_proj", 1)):
        with pytest.raises(hooks.HookError) as info:
            hooks.parse_layers([pattern], video_mar(**CONFIG))
        assert str(info.value).startswith(f"layer pattern {pattern!r} matches no module; the model's names do not start "
                                          f"with '{prefix}' (drop it: {rest!r} matches {count}); nearest names: [")
    with pytest.raises(hooks.HookError) as info:  # a pattern whose rest is all wildcards gets no such hint
        hooks.parse_layers(["encoder_block.*"], video_mar(**CONFIG))
    assert str(info.value) == ("layer pattern 'encoder_block.*' matches no module; did you mean 'encoder_blocks.*' "
                               "(it matches 2)? nearest names: ['encoder_blocks.0', 'encoder_blocks.1', 'encoder_blocks', "
                               "'decoder_blocks.0', 'decoder_blocks.1']")
    # the other way round: the MAR's names (a probe's layer) on the policy that wraps it
    policy = nn.Module()
    policy.model = video_mar(**CONFIG)
    with pytest.raises(hooks.HookError) as info:
        hooks.parse_layers(["decoder_norm"], policy)
    assert str(info.value).startswith("layer pattern 'decoder_norm' matches no module; this model holds it under 'model.' "
                                      "('model.decoder_norm'; or hand over the module 'model' itself); nearest names: [")


def test_containers_that_are_never_called_are_refused_or_left_out(caplog):
    model = video_mar(**CONFIG)
    with pytest.raises(hooks.HookError) as info:
        hooks.parse_layers(["encoder_blocks"], model)
    assert str(info.value) == ("layer pattern 'encoder_blocks' selects encoder_blocks: a ModuleList, which is never "
                               "called itself; select its modules, e.g. 'encoder_blocks.*'")
    caplog.set_level("INFO", logger="marstore.hooks")
    chosen = hooks.parse_layers([r"re:(en|de)coder_blocks(\.\d+)?"], model)
    assert [s.name for s in chosen] == ["encoder_blocks.0", "encoder_blocks.1", "decoder_blocks.0", "decoder_blocks.1"]
    assert "left out 2 containers that are never called: encoder_blocks, decoder_blocks" in caplog.text


class WithScripted(nn.Module):
    """A TorchScript submodule (torch.jit.script), as exported or fused parts of models are."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.fused = torch.jit.script(nn.Sequential(nn.Linear(8, 4), nn.ReLU()))

    def forward(self, x):
        return self.fused(self.fc(x))


def test_a_torchscript_module_is_refused_or_left_out_and_the_modules_around_it_are_stored(tmp_path, caplog):
    model = WithScripted()
    with pytest.raises(hooks.HookError) as info:
        hooks.parse_layers(["fused.*"], model)
    assert str(info.value) == ("layer pattern 'fused.*' selects fused.0, fused.1: TorchScript (torch.jit.script or "
                               "torch.jit.load), which takes no hooks; hook the Python module that calls it, or its "
                               "caller's input (MODULE@input)")
    caplog.set_level("INFO", logger="marstore.hooks")
    assert [s.name for s in hooks.parse_layers(["**"], model)] == ["fc"]
    assert "left out 3 TorchScript modules, which take no hooks: fused, fused.0, fused.1" in caplog.text
    # a model holding one is extracted (its state checked, its forward's defaults read) as any other
    x = torch.randn(16, 8)
    result = extract_from(model, [{"x": r} for r in x], str(tmp_path / "s.h5"), ["fc"], batch_size=4, progress=False)
    with torch.inference_mode(), open_store(result.path) as s:
        assert s.read("fc").tobytes() == torch.cat([model.fc(x[i:i + 4]) for i in range(0, 16, 4)]).half().numpy().tobytes()

class SequenceFirst(nn.Module):
    """torch's sequence modules as built by default (batch_first=False): they take and give
    (sequence, batch, ...), and an RNN's hidden state is (layers, batch, hidden)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
        self.attn = nn.MultiheadAttention(8, 2)
        self.rnn = nn.GRU(8, 8, num_layers=2)

    def forward(self, x):  # (batch, tokens, 8)
        h = self.enc(x.transpose(0, 1))
        h = h + self.attn(h, h, h, need_weights=True)[0]
        return self.rnn(h)[0]


def test_sequence_first_modules_are_stored_a_row_per_sample_also_where_tokens_equal_the_batch(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    data = [torch.randn(4, 8, generator=torch.Generator().manual_seed(i)) for i in range(8)]  # 4 tokens, batches of 4
    model = SequenceFirst().eval()
    seen: dict[str, list] = collections.defaultdict(list)
    handles = [model.get_submodule(name).register_forward_hook(
        lambda m, a, o, name=name: seen[name].append(o)) for name in ("enc", "attn", "rnn")]
    with torch.inference_mode():
        for start in (0, 4):
            model(torch.stack(data[start:start + 4]))
    for h in handles:
        h.remove()
    layers = ["enc", "attn:0", "attn:1", "rnn:0", "rnn:1", "attn@input:key"]
    result = extract_from(model, data, str(tmp_path / "s.h5"), layers, batch_size=4, progress=False)
    # the batch's own axis, the second of (tokens, batch, ...) and of the GRU's (layers, batch, hidden), the first of the
    # attention weights' (batch, tokens, tokens)
    expected = {"enc": [o.transpose(0, 1) for o in seen["enc"]], "attn:0": [o[0].transpose(0, 1) for o in seen["attn"]],
                "attn:1": [o[1] for o in seen["attn"]], "rnn:0": [o[0].transpose(0, 1) for o in seen["rnn"]],
                "rnn:1": [o[1].transpose(0, 1) for o in seen["rnn"]], "attn@input:key": [o.transpose(0, 1) for o in seen["enc"]]}
    with open_store(result.path) as s:
        for name, parts in expected.items():
            assert s.read(name).tobytes() == torch.cat(parts).half().numpy().tobytes(), name
        assert s.layers["rnn:1"].row_shape == (2, 8) and s.layers["attn:1"].row_shape == (4, 4)
        assert [layer["batch_axis"] for layer in s.metadata["layers"]] == [1, 1, 0, 1, 1, 1]
    assert ("enc: the output of a TransformerEncoderLayer (batch_first=False) is (sequence or layers, batch, ...): each "
            "sample's row is taken from its second axis") in caplog.text
    # a store that an earlier marstore began took such rows from the first axis: a resume cannot go on with it

    def stop(rows):
        raise KeyboardInterrupt

    out = tmp_path / "old.h5"
    with pytest.raises(Interrupted):
        extract_from(model, data, str(out), ["enc"], batch_size=4, progress=False, commit_rows=4, on_batch=stop)
    with h5py.File(out, "r+") as f:
        run = json.loads(f.attrs["run"])
        f.attrs["run"] = json.dumps({**run, "layers": [{k: v for k, v in layer.items() if k != "batch_axis"}
                                                         for layer in run["layers"]]})
    with pytest.raises(extract_module.RestartNeeded) as info:
        extract_from(model, data, str(out), ["enc"], batch_size=4, progress=False, commit_rows=4, resume=True)
    assert str(info.value) == (f"--resume: {out} took the rows of enc from the first axis of their (sequence, batch, ...) "
                               "tensors, as marstore did before it read torch's batch_first: those rows are positions, "
                               "not samples; extract into a new store")
    # built with batch_first, the same modules are read as they are
    batch_first = nn.ModuleDict({"enc": nn.TransformerEncoderLayer(8, 2, batch_first=True), "rnn": nn.GRU(8, 8, batch_first=True)})
    assert [(s.store_name, s.batch_axis) for s in hooks.parse_layers(["enc", "rnn:0", "rnn:1"], batch_first)] == [
        ("enc", 0), ("rnn:0", 0), ("rnn:1", 1)]

class Blocks(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.GELU()) for _ in range(2))
        self.register_buffer("scale", torch.full((8,), float(seed)))

    def forward(self, x):
        for block in self.blocks:
            x = block(x) * self.scale
        return x.sum()


@pytest.mark.parametrize("saved_compiled", [False, True])
def test_a_compiled_model_takes_its_own_names_for_layers_and_weights(tmp_path, caplog, saved_compiled):
    """torch.compile wraps the model under '_orig_mod.': the layers keep the names that runs of
    the model itself give, and a checkpoint of either loads into it (it loaded none, and the run went
    on with the compiled model's random weights, its patterns refused for lacking '_orig_mod.').
    The hooks run outside dynamo's graphs: traced, they were specialised on each layer and
    recompiled past dynamo's limit, the model's graphs broken where they were."""
    traced: list[str] = []  # where the code compiled into graphs comes from

    def backend(graph_module, example_inputs):
        traced.extend(node.meta.get("stack_trace") or "" for node in graph_module.graph.nodes)
        return graph_module.forward

    torch.compiler.reset()  # graphs of Blocks.forward that tests before compiled are not reused
    trained = Blocks(seed=1)
    path = tmp_path / "weights.pt"
    torch.save((torch.compile(trained, backend="eager") if saved_compiled else trained).state_dict(), path)
    data = [torch.randn(3, 8, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    compiled = torch.compile(Blocks(seed=2), backend=backend)
    with caplog.at_level(logging.INFO, logger="marstore"):
        result = extract_from(compiled, data, str(tmp_path / "s.h5"), ["blocks.*"], checkpoint=str(path), batch_size=4,
                              progress=False, strict=True)
    assert "the model is wrapped (OptimizedModule): its layers and weights are named as in the Blocks inside, without " \
           "'_orig_mod.' or 'module.'" in caplog.messages
    assert result.load_report["loaded"] == 5 and result.load_report["missing_count"] == 0
    assert result.load_report["stripped_prefix"] == ("_orig_mod." if saved_compiled else None)
    captured = {}
    handles = [trained.blocks[i].register_forward_hook(lambda m, a, out, i=i: captured.setdefault(i, []).append(out.half()))
               for i in range(2)]
    with torch.inference_mode():
        trained(torch.stack(data[:4])), trained(torch.stack(data[4:]))
    for handle in handles:
        handle.remove()
    with open_store(result.path) as s:
        assert list(s.layers) == ["blocks.0", "blocks.1"]
        for i in range(2):
            assert s.read(f"blocks.{i}").tobytes() == torch.cat(captured[i]).numpy().tobytes()
    assert hooks.hook_count(compiled) == 0
    assert traced and not [trace for trace in traced if "hooks.py" in trace]


def test_blocks_compiled_one_by_one_keep_the_models_names(tmp_path, caplog):
    """Compiling each block (model.blocks[i] = torch.compile(block), as torchtitan does) puts
    '_orig_mod' inside the names: a plain checkpoint loaded none of the blocks' weights, and
    'blocks.*.0' matched nothing. A checkpoint of such a model loads into a plain one too."""
    torch.compiler.reset()
    trained = Blocks(seed=1)
    path = tmp_path / "weights.pt"
    torch.save(trained.state_dict(), path)
    model = Blocks(seed=2)
    for i, block in enumerate(model.blocks):
        model.blocks[i] = torch.compile(block, backend="eager")
    assert "blocks.0._orig_mod.0.weight" in model.state_dict()
    data = [torch.randn(3, 8, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    with caplog.at_level(logging.INFO, logger="marstore"):
        result = extract_from(model, data, str(tmp_path / "s.h5"), ["blocks.*", "blocks.*.0"], checkpoint=str(path),
                              batch_size=4, progress=False, strict=True)
    assert ("2 of its modules are compiled one by one (torch.compile), as blocks.0: named as the modules they wrap, without "
            "'_orig_mod'") in caplog.messages
    assert result.load_report["loaded"] == 5 and result.load_report["missing_count"] == 0
    captured = {}
    names = ["blocks.0", "blocks.1", "blocks.0.0", "blocks.1.0"]
    handles = [trained.get_submodule(name).register_forward_hook(
        lambda m, a, out, name=name: captured.setdefault(name, []).append(out.half())) for name in names]
    with torch.inference_mode():
        trained(torch.stack(data[:4])), trained(torch.stack(data[4:]))
    for handle in handles:
        handle.remove()
    with open_store(result.path) as s:
        assert sorted(s.layers) == sorted(names)
        for name in names:
            assert s.read(name).tobytes() == torch.cat(captured[name]).numpy().tobytes(), name
    report = load_weights(Blocks(seed=3), model.state_dict(), strict=True)  # and back: its checkpoint into a plain model
    assert report.loaded == 5 and report.stripped_prefix is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="nn.DataParallel takes the GPUs where there are any")
def test_a_data_parallel_model_is_named_as_the_module_inside_and_refused_over_several_gpus(tmp_path):
    """nn.DataParallel (and DistributedDataParallel) put 'module.' before every name: a plain
    checkpoint loaded none of the weights, and patterns needed the prefix. Over several GPUs it
    runs the hooks on copies of the model, each on a part of the batch: refused."""
    trained = Blocks(seed=1)
    path = tmp_path / "weights.pt"
    torch.save(trained.state_dict(), path)
    wrapped = nn.DataParallel(Blocks(seed=2))
    data = [torch.randn(3, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    result = extract_from(wrapped, data, str(tmp_path / "s.h5"), ["blocks.*"], checkpoint=str(path), batch_size=4,
                          progress=False, strict=True)
    assert result.load_report["loaded"] == 5
    with torch.inference_mode():
        expected = trained.blocks[0](torch.stack(data)).half()
    with open_store(result.path) as s:
        assert sorted(s.layers) == ["blocks.0", "blocks.1"] and s.read("blocks.0").tobytes() == expected.numpy().tobytes()
    wrapped.device_ids = [0, 1]
    with pytest.raises(ExtractError) as info:
        extract_from(wrapped, data, str(tmp_path / "t.h5"), ["blocks.*"], batch_size=4, progress=False)
    assert str(info.value) == ("the model is an nn.DataParallel over 2 GPUs, which splits each batch over copies of the "
                               "model, the hooks with them: hand over model.module (a run uses one device)")
    assert not os.path.exists(tmp_path / "t.h5")


def test_a_distributed_data_parallel_model_is_named_as_the_module_inside(tmp_path, monkeypatch):
    """DistributedDataParallel on one process (gloo): its layers and weights without 'module.'."""
    import torch.distributed as dist

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):  # a one-process group of its own, not a scale-out run
        monkeypatch.delenv(name, raising=False)
    trained = Blocks(seed=1)
    path = tmp_path / "weights.pt"
    torch.save(trained.state_dict(), path)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        wrapped = nn.parallel.DistributedDataParallel(Blocks(seed=2))
        data = [torch.randn(3, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)]
        result = extract_from(wrapped, data, str(tmp_path / "s.h5"), ["blocks.*"], checkpoint=str(path), batch_size=4,
                              progress=False, strict=True)
    finally:
        dist.destroy_process_group()
    assert result.load_report["loaded"] == 5
    with torch.inference_mode():
        expected = trained.blocks[0](torch.stack(data)).half()
    with open_store(result.path) as s:
        assert sorted(s.layers) == ["blocks.0", "blocks.1"] and s.read("blocks.0").tobytes() == expected.numpy().tobytes()


def test_a_model_compiled_whole_graph_is_refused_in_one_line(tmp_path):
    """fullgraph=True lets no Python run in the graph, and the hooks must: dynamo's error said
    to remove torch.compiler.disable."""
    data = [torch.randn(3, 8) for _ in range(6)]
    torch.compiler.reset()  # dynamo would reuse Blocks.forward's graphs of the tests before, broken at the hooks
    with pytest.raises(ExtractError) as info:
        extract_from(torch.compile(Blocks(seed=2), backend="eager", fullgraph=True), data, str(tmp_path / "s.h5"),
                     ["blocks.*"], batch_size=4, progress=False)
    assert str(info.value) == (
        "the model or the forward is compiled with fullgraph=True (torch.compile), which lets no Python run inside its "
        "graph, and the hooks must run there: compile it without fullgraph (each hooked module then breaks the graph), or "
        "hand it over uncompiled")
    assert os.listdir(tmp_path) == []


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lstm = nn.LSTM(8, 6, num_layers=2, batch_first=True)

    def forward(self, x):
        return self.lstm(x)[0]


def test_elements_inside_an_element_are_picked_as_an_lstms_hidden_and_cell_states(tmp_path):
    assert hooks._split_pattern("lstm:1:0") == ("lstm", "output", 1, (0,))
    assert hooks._split_pattern("blocks.0@input:x:mask") == ("blocks.0", "input", "x", ("mask",))
    assert hooks._split_pattern("re:enc.*:0") == ("re:enc.*", "output", 0, ())
    data = [torch.randn(5, 8, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    model = Recurrent().eval()
    result = extract_from(model, data, str(tmp_path / "s.h5"), ["lstm:0", "lstm:1:0", "lstm:1:1"], batch_size=4,
                          progress=False)
    with torch.inference_mode():
        parts = [model.lstm(torch.stack(data[i:i + 4])) for i in (0, 4)]
    # the LSTM's (output, (h_n, c_n)): h_n and c_n are (layers, batch, hidden), batch_first or not
    expected = {"lstm:0": [p[0] for p in parts], "lstm:1:0": [p[1][0].transpose(0, 1) for p in parts],
                "lstm:1:1": [p[1][1].transpose(0, 1) for p in parts]}
    with open_store(result.path) as s:
        assert list(s.layers) == ["lstm:0", "lstm:1:0", "lstm:1:1"] and s.layers["lstm:1:1"].row_shape == (2, 6)
        for name, want in expected.items():
            assert s.read(name).tobytes() == torch.cat(want).half().numpy().tobytes(), name
    for pattern, error in (
            ("lstm:1", "lstm:1: the output of lstm:1 is a tuple, not a tensor; pick a tensor element with ':index' or "
                       "':key' (one more ':index' picks inside it)"),
            ("lstm:1:2", "lstm:1:2: the output of lstm:1 is a tuple with no element 2; it has elements 0 to 1"),
            ("lstm:0:1", "lstm:0:1: the output of lstm:0 is a tensor, and ':1' picks an element of a tuple, list or dict; "
                         "hook lstm:0 without it (--reduction picks tokens)")):
        with pytest.raises(hooks.HookError) as info:
            extract_from(model, data, str(tmp_path / "bad.h5"), [pattern], batch_size=4, progress=False)
        assert str(info.value) == error

class PackedRecurrent(nn.Module):
    """An LSTM run on pack_padded_sequence's sequences of different lengths, as RNN code does."""

    def __init__(self, batch_first: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.batch_first = batch_first
        self.lstm = nn.LSTM(8, 6, num_layers=2, batch_first=batch_first)

    def forward(self, x, n):
        x = x if self.batch_first else x.transpose(0, 1)
        out, (h, c) = self.lstm(pack_padded_sequence(x, n, batch_first=self.batch_first, enforce_sorted=False))
        return h[-1]


@pytest.mark.parametrize("batch_first", [True, False])
def test_a_packed_sequence_is_stored_ragged_each_sample_its_own_steps(tmp_path, batch_first):
    data = [{"x": torch.randn(7, 8, generator=torch.Generator().manual_seed(i)), "n": 2 + i % 5} for i in range(12)]
    model = PackedRecurrent(batch_first).eval()
    layers = ["lstm:0", "lstm:1:0", "lstm@input"]
    survey = extract_from(model, data, "", layers, batch_size=4, progress=False, dry_run=True)
    assert [(s.gave, s.row, s.tokens) for s in survey.layers] == [
        ("tuple(PackedSequence(4, 2-5, 6) float32, tuple of 2)", (6,), (2, 6)),
        ("tuple(PackedSequence(4, 2-5, 6) float32, tuple of 2)", (2, 6), None),
        ("PackedSequence(4, 2-5, 8) float32", (8,), (2, 6))]
    result = extract_from(model, data, str(tmp_path / "s.h5"), layers, batch_size=4, progress=False)
    outputs, hidden = [], []
    with torch.inference_mode():
        for start in range(0, 12, 4):
            x, n = torch.stack([d["x"] for d in data[start:start + 4]]), torch.tensor([d["n"] for d in data[start:start + 4]])
            out, (h, _) = model.lstm(pack_padded_sequence(x if batch_first else x.transpose(0, 1), n,
                                                          batch_first=batch_first, enforce_sorted=False))
            padded, lengths = pad_packed_sequence(out, batch_first=True)  # in the batch's order
            outputs += [padded[i, :k] for i, k in enumerate(lengths)]
            hidden.append(h.transpose(0, 1))
    with open_store(result.path) as s:
        assert [len(r) for r in s.read("lstm:0")] == [2 + i % 5 for i in range(12)]
        assert [r.tobytes() for r in s.read("lstm:0")] == [o.half().numpy().tobytes() for o in outputs]
        assert s.read("lstm:1:0").tobytes() == torch.cat(hidden).half().numpy().tobytes()
        assert [r.tobytes() for r in s.read("lstm@input")] == [d["x"][:d["n"]].half().numpy().tobytes() for d in data]

def test_multi_fire_policies_and_modules_that_do_not_fire():
    torch.manual_seed(0)
    model, x = Toy(), torch.randn(3, 4)
    sel = hooks.parse_layers(["loop"], model)
    for policy, expect_shape in (("first", (3, 4)), ("last", (3, 4)), ("stack", (3, 3, 4))):
        with hooks.Capture(model, sel, multi_fire=policy) as cap:
            cap.start_batch()
            model(x, steps=3)
            assert tuple(cap.finish_batch()["loop"].shape) == expect_shape
    with hooks.Capture(model, sel) as cap, pytest.raises(hooks.HookError, match="loop fired more than once in one forward"):
        cap.start_batch()
        model(x, steps=3)
    with hooks.Capture(model, hooks.parse_layers(["never"], model)) as cap:
        cap.start_batch()
        model(x)
        with pytest.raises(hooks.HookError, match="never did not fire in this batch"):
            cap.finish_batch()
    with hooks.Capture(model, hooks.parse_layers(["never"], model), allow_missing=True) as cap:
        cap.start_batch()
        model(x)
        assert cap.finish_batch() == {} and cap.missing_counts == {"never": 1}


class Tied(nn.Module):
    """One block under two names (tied weights), used twice: torch names it once, 'enc.0'."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
        self.dec = self.enc

    def forward(self, x):
        return self.dec(self.enc(x) * 2)


def test_a_module_held_under_two_names_is_named_by_its_first_and_fires_at_each_use():
    torch.manual_seed(0)
    model, x = Tied(), torch.randn(3, 4)
    for pattern, alias, name in (("dec", "dec", "enc"), ("dec.0", "dec.0", "enc.0"), ("de?.1", "dec.1", "enc.1")):
        with pytest.raises(hooks.HookError) as err:
            hooks.parse_layers([pattern], model)
        assert str(err.value) == (
            f"layer pattern {pattern!r}: {alias} is {name} under another name (the model holds one module under both, as "
            f"tied weights do, and torch names it once); hook {name!r}: it fires at each use, and --multi-fire first, "
            "last or stack (every use, in order) keeps the one or all")
    with hooks.Capture(model, hooks.parse_layers(["enc"], model)) as cap, pytest.raises(hooks.HookError) as err:
        cap.start_batch()
        model(x)
    assert str(err.value) == ("enc fired more than once in one forward: the model holds it also as dec (one module under 2 "
                              "names, as tied weights are), and it fires at each use; choose --multi-fire first, last or stack")
    with torch.no_grad():
        first = model.enc(x)
        uses = torch.stack([first, model.enc(first * 2)], dim=1)
    with hooks.Capture(model, hooks.parse_layers(["enc"], model), multi_fire="stack") as cap, torch.no_grad():
        cap.start_batch()
        model(x)
        assert torch.equal(cap.finish_batch()["enc"], uses)


def test_hooks_removed_after_exception_and_keyboard_interrupt():
    model = Toy()
    for exc in (RuntimeError, KeyboardInterrupt):
        with pytest.raises(exc):
            with hooks.Capture(model, hooks.parse_layers(["a", "loop", "head@input"], model)):
                assert hooks.hook_count(model) == 3
                raise exc
        assert hooks.hook_count(model) == 0


def test_stop_early_skips_the_rest_of_the_forward():
    model = Toy()
    calls = []
    model.head.register_forward_hook(lambda *a: calls.append(1))
    with hooks.Capture(model, hooks.parse_layers(["a"], model), stop_early=True) as cap:
        cap.start_batch()
        with pytest.raises(hooks.StopForward):
            model(torch.randn(2, 4))
        assert set(cap.finish_batch()) == {"a"}
    assert calls == []

    class Guarded(nn.Module):  # a model that falls back on any Exception must not swallow the stop
        def __init__(self):
            super().__init__()
            self.inner = Toy()

        def forward(self, x):
            try:
                return self.inner(x)
            except Exception:  # noqa: BLE001
                return None

    guarded = Guarded()
    with hooks.Capture(guarded, hooks.parse_layers(["inner.a"], guarded), stop_early=True) as cap:
        cap.start_batch()
        with pytest.raises(hooks.StopForward):
            guarded(torch.randn(2, 4))
    with hooks.Capture(guarded, hooks.parse_layers(["inner.a"], guarded)) as cap:
        cap.start_batch(rows=3)  # the hook refuses 2 rows for 3 samples; the model swallows that
        assert guarded(torch.randn(2, 4)) is None
        with pytest.raises(hooks.HookError, match=r"^inner.a: 2 leading rows for a batch of 3 samples"):
            cap.finish_batch()


def test_an_extraction_stopped_early_keeps_the_same_rows_and_no_outputs(tmp_path):
    full = extract(options(tmp_path, out=str(tmp_path / "full.h5"), layers=["encoder_blocks.0"], num_samples=16))
    early = extract(options(tmp_path, out=str(tmp_path / "early.h5"), layers=["encoder_blocks.0"], num_samples=16,
                            stop_early=True))
    assert early.outputs == {} and set(full.outputs) == {"loss", "loss_1", "loss_2"}
    with open_store(full.path) as a, open_store(early.path) as b:
        assert b.rows == 16 and np.array_equal(a.read("encoder_blocks.0"), b.read("encoder_blocks.0"))


def test_a_module_with_several_rows_a_sample_is_refused_or_unfolded(tmp_path):
    # UVA's action head runs on B*4 rows: diffactloss.fc gives (32, 32) for a batch of 8
    with pytest.raises(hooks.HookError, match=r"^diffactloss.fc: 32 leading rows for a batch of 8 samples \(4 a sample: "
                                              r"the module folds another axis into the batch\); pass --unfold-batch to "
                                              r"store them as \(8, 4, \.\.\.\)"):
        extract(options(tmp_path, layers=["encoder_blocks.0", "diffactloss.fc"]))
    assert not (tmp_path / "s.h5").exists()
    result = extract(options(tmp_path, layers=["diffactloss.fc", "diffactloss.conv"], unfold_batch=True))
    ref = reference_activations(tmp_path, ["diffactloss.fc", "diffactloss.conv"])
    with open_store(result.path) as s:
        assert s.layers["diffactloss.fc"].row_shape == (4, 32) and s.layers["diffactloss.conv"].row_shape == (4, 32, 4, 4)
        for name, parts in ref.items():
            expected = torch.cat([p.reshape(8, 4, *p.shape[1:]) for p in parts])
            assert s.read(name).tobytes() == expected.numpy().tobytes(), name
    # unfolded first, then reduced: the mean over a sample's 4 rows
    result = extract(options(tmp_path, out=str(tmp_path / "mean.h5"), layers=["diffactloss.fc"], unfold_batch=True,
                             reduction="mean"))
    with open_store(result.path) as s:
        assert s.layers["diffactloss.fc"].row_shape == (32,)
    # a convolution's rows unfolded, (B, 4, C, h, w): its channels are the features, and the 4 rows'
    # positions the tokens (the channel axis used to be taken as the 4, averaging the channels away)
    conv = ref["diffactloss.conv"]
    tokens = [p.reshape(8, 4, 32, 16).permute(0, 1, 3, 2).reshape(8, 64, 32) for p in conv]
    for reduction, expected, shape in (("mean", [t.mean(1) for t in tokens], (32,)),
                                       ("0,17", [t[:, [0, 17]] for t in tokens], (2, 32))):
        result = extract(options(tmp_path, out=str(tmp_path / f"conv{reduction}.h5"), layers=["diffactloss.conv"],
                                 unfold_batch=True, channels_first=True, reduction=reduction))
        with open_store(result.path) as s:
            assert s.layers["diffactloss.conv"].row_shape == shape
            got, want = s.read("diffactloss.conv"), torch.cat(expected).half().numpy()
            # token picks are exact; a mean's float32 sum runs in another order than the reference's
            assert np.array_equal(got, want) if reduction != "mean" else np.allclose(got, want, rtol=2e-3, atol=1e-4)
    model = Toy()
    with hooks.Capture(model, hooks.parse_layers(["a"], model, unfold=True)) as cap:
        cap.start_batch(3)
        with pytest.raises(hooks.HookError, match=r"^a: 4 leading rows for a batch of 3 samples; marstore stores one row"):
            model(torch.randn(4, 4))


def test_an_unfold_layout_orders_the_rows_of_a_module_that_repeats_the_batch(tmp_path):
    # MAR's diffusion loss runs on B*t token rows repeated 4 times (x.repeat(4, 1)): ordered (m b t)
    run = dict(model_args=dict(CONFIG, diffusion_batch_mul=4), forward="marstore.models:dynamic_forward",
               layers=["decoder_norm", "diffloss@input", "diffloss.net.res_blocks.0"])
    result = extract(options(tmp_path, unfold_batch="(m=4 b t)", **run))
    with open_store(result.path) as s:
        tokens, copies = s.read("decoder_norm"), s.read("diffloss@input")
        assert tokens.shape == (40, 64, 32) and copies.shape == (40, 4, 64, 32)
        assert all(np.array_equal(copies[:, m], tokens) for m in range(4))  # each copy: its own sample's tokens
        layer = s.layers["diffloss.net.res_blocks.0"]
        assert layer.row_shape == (4, 64, 32) and (layer.attrs["unfolded"], layer.attrs["unfold_layout"]) == (256, "(m=4 b t=64)")
        assert "unfolded" not in s.layers["decoder_norm"].attrs
        blocks = s.read("diffloss.net.res_blocks.0")
    # taken as sample-major, the same rows mix the samples of a batch
    plain = extract(options(tmp_path, out=str(tmp_path / "plain.h5"), unfold_batch=True, **run))
    with open_store(plain.path) as s:
        assert s.layers["diffloss@input"].attrs["unfold_layout"] == "(b k=256)"
        assert not np.array_equal(s.read("diffloss@input")[:, :64], tokens)
        module_rows = s.read("diffloss.net.res_blocks.0").reshape(5, 8 * 256, 32)  # each batch's rows, as the module had them
    expected = np.concatenate([rows.reshape(4, 8, 64, 32).transpose(1, 0, 2, 3) for rows in module_rows])
    assert blocks.tobytes() == expected.tobytes()
    # every size given, or one left to infer; sizes that do not fit are refused before anything is stored
    for layout in ("(m b t=64)", "(m=4 b t=64)"):
        again = extract(options(tmp_path, out=str(tmp_path / f"{len(layout)}.h5"), unfold_batch=layout, **run))
        with open_store(again.path) as s:
            assert s.read("diffloss.net.res_blocks.0").tobytes() == blocks.tobytes()
    with pytest.raises(hooks.HookError, match=re.escape(
            "diffloss@input: 2048 leading rows for a batch of 8 samples do not unfold as (m=3 b t): 256 a sample, "
            "the layout gives a multiple of 3")):
        extract(options(tmp_path, out=str(tmp_path / "bad.h5"), unfold_batch="(m=3 b t)", **run))
    assert not (tmp_path / "bad.h5").exists()
    with pytest.raises(hooks.HookError, match=re.escape("do not unfold as (m=4 b t=32): 256 a sample, the layout gives 128")):
        extract(options(tmp_path, out=str(tmp_path / "bad.h5"), unfold_batch="(m=4 b t=32)", **run))


@pytest.mark.parametrize("layout, error", [
    ("m b", "not in parentheses"),
    ("(m k)", "it must name the batch axis b once"),
    ("(b m b)", "it must name the batch axis b once"),
    ("(b=8 k)", "the batch axis b takes the batch's size; give sizes to the other axes"),
    ("(b)", "nothing to unfold beside b"),
    ("(k b k)", "each axis once, and at least one beside b"),
    ("(m b t)", "give the sizes of all its axes but one beside b (m=4)"),
    ("(m=0 b)", "'m=0' is neither an axis name nor name=size with a size of at least 1"),
    ("(m-1 b)", "'m-1' is neither an axis name nor name=size with a size of at least 1"),
])
def test_a_bad_unfold_layout_is_refused_in_one_line(layout, error):
    with pytest.raises(hooks.HookError) as info:
        hooks.UnfoldLayout.parse(layout)
    assert str(info.value) == (f"unfold layout {layout!r}: {error}; write the module's batch axis as einops does: '(b k)' "
                               "for k rows a sample, sample-major; '(k b)' for k copies of the batch one after another "
                               "(x.repeat(k, 1)); '(m=4 b t)' for MAR's diffusion loss, which repeats its B*t token rows 4 times")


def test_unfold_layouts_by_pattern():
    model = video_mar(**CONFIG)
    layers = ["diffloss@input", "diffloss.net.res_blocks.*", "diffactloss.conv", "decoder_norm"]
    selected = hooks.parse_layers(layers, model, unfold={"diffloss.**": "(m=4 b t)", "diffloss": "(m=4 b t)",
                                                         "diffactloss.conv": "(b k)"})
    assert {sel.store_name: str(sel.unfold) if sel.unfold else None for sel in selected} == {
        "diffloss@input": "(m=4 b t)", "diffloss.net.res_blocks.0": "(m=4 b t)", "diffloss.net.res_blocks.1": "(m=4 b t)",
        "diffactloss.conv": "(b k)", "decoder_norm": None}
    with pytest.raises(hooks.HookError, match=re.escape(
            "diffactloss.conv: --unfold-batch diffactloss.*=(b k) and diffactloss.conv=(k b) both select it; give it one layout")):
        hooks.parse_layers(layers, model, unfold={"diffactloss.*": "(b k)", "diffactloss.conv": "(k b)"})
    with pytest.raises(hooks.HookError, match=re.escape("--unfold-batch 'diffactloss.fc' matches none of the layers")):
        hooks.parse_layers(layers, model, unfold={"diffactloss.fc": "(b k)"})
    with pytest.raises(hooks.HookError, match=re.escape("--unfold-batch diffloss=(b): unfold layout '(b)': nothing to unfold")):
        hooks.parse_layers(layers, model, unfold={"diffloss": "(b)"})
    x = torch.arange(24).reshape(12, 2)  # 3 samples: rows (k=2 b t=2), sample s's rows are 2s, 2s+1, 6+2s, 7+2s
    unfolded = hooks.UnfoldLayout.parse("(k=2 b t)").unfold(x, 3)
    assert unfolded.shape == (3, 2, 2, 2) and unfolded[1, :, :, 0].tolist() == [[4, 6], [16, 18]]
    assert torch.equal(hooks.UnfoldLayout.parse("(b k)").unfold(x, 3), x.reshape(3, 4, 2))


def test_reductions_on_device():
    x = torch.arange(24.0).view(2, 3, 4)
    assert torch.equal(hooks.reduce_tokens(x, "mean"), x.mean(1))
    assert torch.equal(hooks.reduce_tokens(x, "first"), x[:, 0])
    assert torch.equal(hooks.reduce_tokens(x, "last"), x[:, 2])
    assert torch.equal(hooks.reduce_tokens(x, [0, -1]), x[:, [0, 2]])
    with pytest.raises(hooks.HookError, match="token index \\[5\\] is out of range for 3 tokens"):
        hooks.reduce_tokens(x, [5])
    frames = torch.arange(48.0).view(2, 2, 3, 4)  # (B, frames, tokens, D), as UVA's z_proj: 6 tokens
    assert torch.equal(hooks.reduce_tokens(frames, "mean"), frames.view(2, 6, 4).mean(1))
    assert torch.equal(hooks.reduce_tokens(frames, "last"), frames[:, 1, 2])
    assert torch.equal(hooks.reduce_tokens(frames, [0, 4]), frames.view(2, 6, 4)[:, [0, 4]])
    with pytest.raises(hooks.HookError, match="needs \\(batch, tokens, features\\) activations, got shape \\(2, 4\\)"):
        hooks.reduce_tokens(x[:, 0], "mean")
    # mean:G, the means of G equal groups of tokens in order: a frame's tokens each
    assert torch.equal(hooks.reduce_tokens(frames, "mean:2"), frames.mean(2))
    assert torch.equal(hooks.reduce_tokens(frames, "mean:3"), frames.view(2, 3, 2, 4).mean(2))
    assert torch.equal(hooks.reduce_tokens(frames, "mean:1"), hooks.reduce_tokens(frames, "mean")[:, None])
    with pytest.raises(hooks.HookError, match="^reduction mean:4: its 6 tokens do not split into 4 equal groups$"):
        hooks.reduce_tokens(frames, "mean:4")
    assert hooks.parse_reduction("mean:4") == "mean:4"
    # token spans, as Python slices: UVA's first frame is 0:256
    assert hooks.parse_reduction("0:3,5,8:14:3") == [0, 1, 2, 5, 8, 11]
    # and shown so, where the store records the list (marstore info, errors)
    for indices, text in (([0, 1, 2, 5, 8, 11], "0:3,5:14:3"), (list(range(0, 1024, 4)), "0:1024:4"),
                          ([-1, 0, 1, 2], "-1,0:3"), ([3, 3, 3, 2], "3,3,3,2"), ([0, 5, 10, 11], "0:15:5,11")):
        recorded = hooks.recorded_reduction(indices, channels_first=False)
        assert hooks.reduction_text(recorded) == text and hooks.parse_reduction(text) == indices
    assert hooks.reduction_text(hooks.recorded_reduction(list(range(16)), True)) == "0:16 (channels first)"
    assert torch.equal(hooks.reduce_tokens(frames, hooks.parse_reduction("0:3")), frames[:, 0])
    for text in ("mean:0", "mean:", "mean:x", "means:4", "3:3", "5:2", "0:4:0", ":4", "0:", "-4:0", "1,x"):
        with pytest.raises(hooks.HookError) as info:
            hooks.parse_reduction(text)
        assert str(info.value) == (f"reduction {text!r}: use one of ('none', 'mean', 'first', 'last'), mean:G (the means "
                                   "of G equal groups of the tokens, in order: frames) or a comma-separated list of token "
                                   "indices and start:stop[:step] spans (0:256: UVA's first frame)")


def test_frame_means_are_stored_per_frame(tmp_path):
    torch.manual_seed(0)
    result = extract(options(tmp_path, layers=["z_proj", "encoder_blocks.0"], reduction="mean:4"))
    ref = reference_activations(tmp_path, ["z_proj", "encoder_blocks.0"], keep=lambda o: o.float())
    with open_store(result.path) as s:
        assert s.layers["z_proj"].row_shape == (4, 32) and s.layers["encoder_blocks.0"].row_shape == (4, 32)
        assert s.read("z_proj").tobytes() == torch.cat(ref["z_proj"]).mean(2).half().numpy().tobytes()
        tokens = torch.cat(ref["encoder_blocks.0"])  # (B, 4 frames x 16 tokens, D)
        assert s.read("encoder_blocks.0").tobytes() == tokens.unflatten(1, (4, -1)).mean(2).half().numpy().tobytes()
        assert s.layers["z_proj"].attrs["reduction"] == "mean:4"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_token_means_of_16_bit_activations_are_rounded_once(dtype):
    # the mean of 1, 1, 1 + 2**-7 is 1.0026...: float16's nearest is 1 + 3 * 2**-10, while a
    # bfloat16 mean (steps of 2**-7 near 1) would be 1 before the transfer reached float16
    x = torch.tensor([1.0, 1.0, 1.0 + 2**-7]).view(1, 3, 1).to(dtype)
    mean = hooks.reduce_tokens(x, "mean")
    assert mean.dtype == torch.float32
    assert mean.to(torch.float16).item() == 1 + 3 * 2**-10


def test_a_layer_a_reduction_cannot_apply_to_is_named(tmp_path):
    with pytest.raises(hooks.HookError) as info:
        extract(options(tmp_path, layers=["encoder_blocks.0", "diffactloss.refine"], reduction="mean"))
    assert str(info.value) == ("diffactloss.refine: reduction 'mean' needs (batch, tokens, features) activations, got shape "
                               "(8, 512); leave it out of --layers, or store it whole: --layer-reduction diffactloss.refine=none")
    assert not (tmp_path / "s.h5").exists()


def reference_activations(tmp_path, layers, device="cpu", autocast=None, keep=lambda o: o.to(torch.float16),
                          forward=policy_forward):
    """A plain reference: forward hooks plus .to(torch.float16) (or keep), batch by batch."""
    torch.manual_seed(0)
    model = video_mar(**CONFIG).eval().to(device)
    ds = synthetic_video_actions(size=40)
    kept = {n: [] for n in layers}
    handles = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: kept[n].append(keep(o).cpu()))
               for n in layers]
    amp = torch.autocast(device, dtype=autocast) if autocast else contextlib.nullcontext()
    with torch.inference_mode(), amp:
        for start in range(0, 40, 8):
            batch = torch.utils.data.default_collate([ds[i] for i in range(start, start + 8)])
            forward(model, {k: v.to(device) for k, v in batch.items()})
    for h in handles:
        h.remove()
    return kept


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_stored_bytes_equal_a_plain_reference(tmp_path, device):
    # on CUDA: hooks -> ring slots on the side stream -> the writer thread, against hooks and .to(float16)
    torch.manual_seed(0)  # extract() seeds torch with opts.seed=0 before building the model, as here
    result = extract(options(tmp_path, layers=["encoder_blocks.*", "decoder_norm", "z_proj"], device=device))
    ref = reference_activations(tmp_path, ["encoder_blocks.0", "encoder_blocks.1", "decoder_norm", "z_proj"], device)
    assert result.rows == 40
    with open_store(result.path) as s:
        for name, parts in ref.items():
            assert s.read(name).tobytes() == torch.cat(parts).numpy().tobytes(), name
        assert s.index().tolist() == list(range(40))
        assert s.target("label").tolist() == [synthetic_video_actions(40)[i]["label"] for i in range(40)]
        assert s.layers["z_proj"].row_shape == (4, 16, 32)  # 4-D output, as UVA's z_proj


def test_the_store_records_the_forwards_order_and_probes_and_similarities_follow_it(tmp_path, capsys):
    """--layers in any order: the store keeps it, and records the order the forward made the
    layers in (a module's @input before its sub-modules' outputs, its output after them), which
    the probes' depth plot and the similarity's table follow."""
    from marstore.probe import ProbeOptions, run_probes
    from marstore.similarity import SimilarityOptions, layer_similarity

    given = ["decoder_norm", "encoder_blocks.*", "z_proj", "decoder_blocks.0@input", "decoder_blocks.0.mlp",
             "decoder_blocks.0", "proj_cond_x_layer", "encoder_norm"]
    forward = ["z_proj", "proj_cond_x_layer", "encoder_blocks.0", "encoder_blocks.1", "encoder_norm",
               "decoder_blocks.0@input", "decoder_blocks.0.mlp", "decoder_blocks.0", "decoder_norm"]
    result = extract(options(tmp_path, layers=given, reduction="mean", dataset_args={"size": 64}))
    with open_store(result.path) as s:
        assert list(s.layers) == ["decoder_norm", "encoder_blocks.0", "encoder_blocks.1", "z_proj", "decoder_blocks.0@input",
                                  "decoder_blocks.0.mlp", "decoder_blocks.0", "proj_cond_x_layer", "encoder_norm"]
        assert s.metadata["forward_order"] == forward
    assert main(["info", result.path]) == 0
    assert f"  the forward ran the layers in the order: {', '.join(forward)}" in capsys.readouterr().out.splitlines()
    report = run_probes(ProbeOptions(store=result.path, layer=given[:3], target="label", out=str(tmp_path / "p"),
                                     progress=False))
    assert [e["layer"] for e in report["layers"]] == ["z_proj", "encoder_blocks.0", "encoder_blocks.1", "decoder_norm"]
    similar = layer_similarity(SimilarityOptions(store=result.path, layer=["decoder_norm", "encoder_norm", "z_proj"],
                                                 out=str(tmp_path / "sim")))
    assert similar["layers"] == ["z_proj", "encoder_norm", "decoder_norm"]
    survey = extract(options(tmp_path, layers=given, reduction="mean", dry_run=True))  # its table in that order too
    table = survey.describe().split("\n\n")[1].splitlines()
    assert [line.split()[0] for line in table[1:]] == forward


def test_a_diffusion_heads_denoising_steps_are_stored_stacked_and_probed_each(tmp_path):
    """UVA's diffusion heads fire once per denoising step: with --multi-fire stack a row holds every
    step, in order, and `marstore probe --tokens each` trains a probe for each step."""
    from marstore.models import sampling_forward
    from marstore.probe import ProbeOptions, load_probe, run_probes

    layer = "diffloss.net.res_blocks.1"
    torch.manual_seed(0)
    result = extract(options(tmp_path, layers=[layer], forward="marstore.models:sampling_forward", multi_fire="stack",
                             reduction="mean"))
    fired = reference_activations(tmp_path, [layer], keep=lambda o: o.mean(1), forward=sampling_forward)[layer]
    assert len(fired) == 5 * 8  # 5 batches of 8 rows, 8 steps each
    steps = torch.stack(fired).unflatten(0, (5, 8)).transpose(1, 2).reshape(40, 8, 32)  # (rows, steps, D)
    with open_store(result.path) as s:
        assert s.layers[layer].row_shape == (8, 32)
        assert s.read(layer).tobytes() == steps.half().numpy().tobytes()
    report = run_probes(ProbeOptions(store=result.path, layer=layer, target="nactions", tokens="each",
                                     out=str(tmp_path / "p"), progress=False))
    assert [e["layer"] for e in report["layers"]] == [f"{layer}[{i}]" for i in range(8)]
    # report.md says what each probe read: one step's token mean
    assert [(e["features"], e["inputs"]) for e in report["layers"][:2]] == [
        ("token 0 of 8 (reduced at extraction: mean)", 32), ("token 1 of 8 (reduced at extraction: mean)", 32)]
    markdown = open(report["markdown"]).read().splitlines()
    assert markdown[4].startswith("| layer | probe input | r2 |")
    assert markdown[6].startswith(f"| {layer}[0] | token 0 of 8 (reduced at extraction: mean), 32 inputs | ")
    last = load_probe(report["layers"][7]["probe"]["weights"])
    assert last.token == 7 and last.predict(steps[:2]).shape == (2, 16, 2)  # the target's shape, as stored


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_channels_first_activations_are_reduced_over_their_positions(tmp_path, device):
    from helpers.inplace import conv_net, images

    def run(out, **kw):
        return extract(ExtractOptions(out=str(tmp_path / out), model="helpers.inplace:conv_net", dataset="helpers.inplace:images",
                                      batch_size=4, progress=False, device=device, **kw))

    with pytest.raises(hooks.HookError) as info:  # (batch, channels, h, w): its channels are not tokens
        run("no.h5", layers=["bn", "block"], reduction="mean")
    assert str(info.value) == ("bn is a BatchNorm2d, whose output is (batch, channels, ...): reduction mean would take "
                               "its channels for tokens; pass --channels-first bn to reduce its positions")
    assert not (tmp_path / "no.h5").exists()
    with pytest.raises(hooks.HookError) as info:  # the flag alone holds for every layer of a run
        hooks.parse_layers(["0", "1"], nn.Sequential(nn.Conv2d(3, 4, 1), nn.Linear(4, 4)), "mean", channels_first=True)
    assert str(info.value) == ("1 is a Linear, whose output keeps its features last: --channels-first given alone applies "
                               "to every layer and would take them for positions; name only the channels-first layers "
                               "(--channels-first PATTERN...)")
    torch.manual_seed(0)
    model = conv_net().to(device).eval()
    seen: dict[str, list] = {}
    for name in ("bn", "block"):
        model.get_submodule(name).register_forward_hook(lambda m, a, o, n=name: seen.setdefault(n, []).append(o.clone()))
    with torch.inference_mode():
        for batch in torch.utils.data.DataLoader(images(), batch_size=4):
            model(batch.to(device))
    for reduction in ("mean", "first"):
        result = run(f"{reduction}.h5", layers=["bn", "block"], reduction=reduction, channels_first=True)
        with open_store(result.path) as s:
            for name, parts in seen.items():
                o = torch.cat(parts)  # (12, 6, 5, 4)
                want = o.movedim(1, -1).flatten(1, -2).mean(1) if reduction == "mean" else o[:, :, 0, 0]
                assert s.layers[name].row_shape == (6,) and s.layers[name].attrs["reduction"] == f"{reduction} (channels first)"
                assert s.read(name).tobytes() == want.to(torch.float16).cpu().numpy().tobytes(), (reduction, name)
                if reduction == "mean":
                    torch.testing.assert_close(torch.from_numpy(s.read(name)).float(), o.mean((2, 3)).cpu(), atol=2e-3, rtol=2e-3)
            assert s.metadata["options"]["channels_first"] is True


def test_a_convolution_stored_whole_records_its_channel_axis_for_reductions_at_read_time(tmp_path):
    # a probe of a convolution stored whole (UVA's action head) used to average its channels with
    # its rows and keep its last position axis as the features; its statistics were per position
    from marstore.dataset import ActivationDataset

    result = extract(options(tmp_path, layers=["encoder_blocks.0", "diffactloss.conv", "diffactloss.fc"], unfold_batch=True))
    ref = reference_activations(tmp_path, ["diffactloss.conv"], keep=lambda o: o.half())
    conv = torch.cat(ref["diffactloss.conv"]).reshape(40, 4, 32, 4, 4)  # (B, k unfolded rows, C, h, w)
    with open_store(result.path) as s:
        assert {n: layer.attrs.get("channel_axis") for n, layer in s.layers.items()} == {
            "encoder_blocks.0": None, "diffactloss.conv": 1, "diffactloss.fc": None}
        assert s.read("diffactloss.conv").tobytes() == conv.numpy().tobytes()  # stored as the module gave it
        per_channel = conv.float().movedim(2, -1).reshape(-1, 32)
        np.testing.assert_allclose(s.layers["diffactloss.conv"].attrs["mean"], per_channel.double().mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(s.layers["diffactloss.conv"].attrs["std"], per_channel.double().std(0, unbiased=False),
                                   rtol=1e-4)
        assert len(s.layers["diffactloss.fc"].attrs["mean"]) == 32
    means = ActivationDataset(result.path, "diffactloss.conv", reduction="mean").read_all()["diffactloss.conv"]
    assert means.shape == (40, 32)
    torch.testing.assert_close(means, conv.float().mean((1, 3, 4)), rtol=1e-5, atol=1e-5)
    from marstore.probe import _features

    # probed with its positions side by side (--tokens flat), it is standardised per channel, as its statistics are
    ds = ActivationDataset(result.path, "diffactloss.conv")
    x, _, _ = _features(ds, np.arange(40), "diffactloss.conv")
    mean, std = (torch.from_numpy(np.asarray(v)).float() for v in ds.stats["diffactloss.conv"])
    assert mean.shape == (32,)
    torch.testing.assert_close(x, ((conv.float().movedim(2, -1) - mean) / std).reshape(40, -1))

    with contextlib.redirect_stdout(io.StringIO()) as shown:
        assert main(["info", result.path]) == 0
    assert "(from float32, reduction none, unfolded from 4 rows a sample, channels at row axis 1)" in shown.getvalue()
    with contextlib.redirect_stdout(io.StringIO()) as shown:
        assert main(["info", "--json", result.path]) == 0
    assert [layer["channel_axis"] for layer in json.loads(shown.getvalue())["layers"].values()] == [None, 1, None]
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Linear(4, 4))
    assert [sel.channels_first for sel in hooks.parse_layers(["0", "1"], net)] == [True, False]  # recognised, recorded
    with pytest.raises(hooks.HookError, match=r"^1 is a Linear, whose output keeps its features last: --channels-first "
                                              r"given alone applies to every layer"):  # its channel axis would be recorded
        hooks.parse_layers(["0", "1"], net, channels_first=True)

def test_a_sequential_block_has_the_layout_of_the_child_that_makes_its_output():
    # a CNN block Sequential(Conv2d, BatchNorm2d, ReLU) gives what its BatchNorm2d gives: (batch, channels, ...)
    class PatchEmbed(nn.Module):  # a convolution whose tokens its own code moves last: its class tells nothing
        def __init__(self):
            super().__init__()
            self.proj = nn.Conv2d(3, 4, 2, stride=2)

        def forward(self, x):
            return self.proj(x).flatten(2).transpose(1, 2)

    net = nn.Sequential(PatchEmbed(), nn.Sequential(nn.Conv2d(4, 4, 1), nn.Sequential(nn.BatchNorm2d(4), nn.ReLU()), nn.Dropout()),
                        nn.Sequential(nn.Linear(4, 4), nn.GELU()), nn.Sequential(nn.ReLU()))
    assert [type(hooks.layout_module(m)).__name__ for m in net] == ["PatchEmbed", "BatchNorm2d", "Linear", "Sequential"]
    assert type(hooks.layout_module(net[1], "input")).__name__ == "Conv2d"
    # stored whole, the block's channel axis is recorded, as a convolution's is; the others' are not
    assert [sel.channels_first for sel in hooks.parse_layers(["0", "1", "2", "3"], net)] == [False, True, False, False]
    with pytest.raises(hooks.HookError) as info:
        hooks.parse_layers(["0", "1"], net, "mean")
    assert str(info.value) == ("1 is a Sequential, whose output (its BatchNorm2d's) is (batch, channels, ...): reduction "
                               "mean would take its channels for tokens; pass --channels-first 1 to reduce its positions")
    with pytest.raises(hooks.HookError, match=r"^1 is a Sequential, whose input \(its Conv2d's\) is \(batch, channels"):
        hooks.parse_layers(["1@input"], net, "mean")
    with pytest.raises(hooks.HookError, match=r"^2 is a Sequential, whose output \(its Linear's\) keeps its features last"):
        hooks.parse_layers(["1", "2"], net, "mean", channels_first=True)
    assert [sel.channels_first for sel in hooks.parse_layers(["0", "1", "3"], net, "mean", channels_first=["1"])] == [
        False, True, False]


class ResidualBlock(nn.Module):
    """A ResNet block: its class tells nothing of its layout, its parts do."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)) + x)


class ConvThenLinear(nn.Module):
    def __init__(self, c: int = 4):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(c, c, 1), nn.Linear(c, c)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(2).transpose(1, 2))


def test_a_block_built_of_channels_first_parts_is_said_to_be_likely_channels_first(tmp_path, caplog):
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(ResidualBlock(), ResidualBlock()), ConvThenLinear())
    assert [sel.likely_channels_first for sel in hooks.parse_layers(["0", "1", "1.0", "2"], net)] == [
        (), ("BatchNorm2d", "Conv2d"), ("BatchNorm2d", "Conv2d"), ()]  # "0" is recognised; "2" mixes layouts
    assert hooks.parse_layers(["1"], net, channels_first=["1"])[0].likely_channels_first == ()

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(i))

    with caplog.at_level("WARNING", logger="marstore.hooks"):
        extract_from(net, Images(), str(tmp_path / "s.h5"), ["1"], batch_size=4, progress=False)
    assert caplog.messages == ["1: its output is likely (batch, channels, ...), from a block built of BatchNorm2d, Conv2d "
                               "only; if so, pass --channels-first 1, or a token reduction (a probe's, at read time) takes "
                               "its channels for tokens"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="marstore.hooks"):
        extract_from(net, Images(), str(tmp_path / "t.h5"), ["1"], batch_size=4, progress=False, channels_first=["1"],
                     reduction="mean")
    assert not caplog.messages
    with open_store(tmp_path / "t.h5") as s:
        assert s.layers["1"].row_shape == (4,)  # its positions pooled, its channels kept


def test_a_store_that_recorded_no_channel_axis_for_a_block_keeps_it_so_when_resumed(tmp_path, monkeypatch, caplog):
    # an earlier marstore did not recognise Sequential(Conv2d, GELU) as channels-first: its store
    # of the block whole has no channel axis, and its statistics run over the last axis
    kw = dict(model="helpers.inplace:conv_net", dataset="helpers.inplace:images", layers=["bn", "block"], batch_size=4,
              commit_rows=4, progress=False, device="cpu")
    with monkeypatch.context() as earlier:
        earlier.setattr(hooks, "layout_module", lambda module, capture="output": module)
        whole = extract(ExtractOptions(out=str(tmp_path / "whole.h5"), **kw))
        with pytest.raises(Interrupted):
            extract(ExtractOptions(out=str(tmp_path / "s.h5"), **kw), on_batch=lambda rows: rows >= 4 and _raise(KeyboardInterrupt))
    with caplog.at_level("INFO", logger="marstore.extract"):
        resumed = extract(ExtractOptions(out=str(tmp_path / "s.h5"), resume=True, **kw))
    assert "records no channel axis for block (an earlier marstore's store): kept so" in caplog.text
    fresh = extract(ExtractOptions(out=str(tmp_path / "fresh.h5"), **kw))
    with open_store(whole.path) as w, open_store(resumed.path) as r, open_store(fresh.path) as f:
        assert r.rows == w.rows == f.rows == 12
        for name in ("bn", "block"):
            assert r.read(name).tobytes() == w.read(name).tobytes() == f.read(name).tobytes()
            assert np.array_equal(r.layers[name].attrs["mean"], w.layers[name].attrs["mean"])
        assert [s.layers["block"].attrs.get("channel_axis") for s in (w, r, f)] == [None, None, 0]
        assert [len(s.layers["block"].attrs["mean"]) for s in (w, r, f)] == [4, 4, 6]  # the last axis, or the channels


def test_one_run_gives_each_layer_its_own_reduction_and_channel_axis(tmp_path):
    # UVA's blocks as token means, its final norm whole, its action head's convolution pooled
    # over its positions: one run, where --reduction and --channels-first used to hold for all
    import yaml


    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model_args": CONFIG, "layer_reductions": {"decoder_norm": "none"}}))
    out = tmp_path / "mixed.h5"
    assert main(["extract", "--config", str(config), "--model", "marstore.models:video_mar",
                 "--dataset", "marstore.models:synthetic_video_actions", "--dataset-arg", "size=40",
                 "--forward", "marstore.models:policy_forward", "--layers", "encoder_blocks.*", "decoder_norm",
                 "diffactloss.conv", "--unfold-batch", "--reduction", "mean", "--layer-reduction", "encoder_blocks.1=last",
                 "encoder_blocks.0=mean",
                 "--channels-first", "diffactloss.conv", "--batch-size", "8", "--device", "cpu", "--out", str(out),
                 "--no-progress"]) == 0
    ref = reference_activations(tmp_path, ["encoder_blocks.0", "encoder_blocks.1", "decoder_norm", "diffactloss.conv"],
                                keep=lambda o: o.clone())
    with open_store(out) as s:
        assert {n: (layer.row_shape, layer.attrs["reduction"]) for n, layer in s.layers.items()} == {
            "encoder_blocks.0": ((32,), "mean"), "encoder_blocks.1": ((32,), "last"),
            "decoder_norm": ((64, 32), "none"), "diffactloss.conv": ((32,), "mean (channels first)")}
        half = lambda parts: torch.cat(parts).half().numpy()  # noqa: E731
        assert s.read("encoder_blocks.0").tobytes() == half([p.mean(1) for p in ref["encoder_blocks.0"]]).tobytes()
        assert s.read("encoder_blocks.1").tobytes() == half([p[:, -1] for p in ref["encoder_blocks.1"]]).tobytes()
        assert s.read("decoder_norm").tobytes() == half(ref["decoder_norm"]).tobytes()
        conv = [p.reshape(8, 4, 32, 16).permute(0, 1, 3, 2).reshape(8, 64, 32).mean(1) for p in ref["diffactloss.conv"]]
        assert np.allclose(s.read("diffactloss.conv"), half(conv), rtol=2e-3, atol=1e-4)
        recorded = s.metadata["options"]
        assert (recorded["layer_reductions"], recorded["channels_first"]) == (
            {"decoder_norm": "none", "encoder_blocks.1": "last", "encoder_blocks.0": "mean"}, ["diffactloss.conv"])
    # a resume must reduce every layer as the store did
    with pytest.raises(ExtractError, match=r"^--resume: the options differ .*: layer_reductions \(recorded "
                                           r"\{'decoder_norm': 'none', 'encoder_blocks.0': 'mean', 'encoder_blocks.1': 'last'\}, "
                                           r"now \{'decoder_norm': 'none'\}\)$"):
        extract(options(tmp_path, out=str(out), layers=["encoder_blocks.*", "decoder_norm", "diffactloss.conv"],
                        targets=[], unfold_batch=True, reduction="mean", layer_reductions={"decoder_norm": "none"},
                        channels_first=["diffactloss.conv"], resume=True))


@pytest.mark.parametrize("kw, error", [
    (dict(layer_reductions={"decoder_*": "none"}), "--layer-reduction 'decoder_*' matches none of the layers --layers "
                                                   "selects (encoder_blocks.0, encoder_blocks.1, 1)"),
    (dict(channels_first=["2"]), "--channels-first '2' matches none of the layers --layers selects (encoder_blocks.0, "
                                 "encoder_blocks.1, 1)"),
    (dict(layer_reductions={"encoder_blocks.*": "first", "re:.*0": [0, 1]}),
     "encoder_blocks.0: --layer-reduction encoder_blocks.*=first and re:.*0=0,1 both select it; give it one reduction"),
    (dict(layer_reductions={"encoder_blocks.*": "none"}), "1 is a Conv1d, whose output is (batch, channels, ...): reduction mean would "
                                                "take its channels for tokens; pass --channels-first 1 to reduce its positions"),
    (dict(channels_first=["re:.*"]), "encoder_blocks.0 is a Linear, whose output keeps its features last: --channels-first "
                                     "re:.* selects it and would take them for positions; name only the channels-first "
                                     "layers (--channels-first PATTERN...)"),
])
def test_per_layer_reductions_and_channel_axes_that_cannot_be_are_refused(kw, error):
    model = nn.Module()
    model.encoder_blocks = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
    model.add_module("1", nn.Conv1d(4, 4, 1))
    with pytest.raises(hooks.HookError) as info:
        hooks.parse_layers(["encoder_blocks.*", "1"], model, "mean", **kw)
    assert str(info.value) == error


def test_a_capture_is_given_its_own_reduction_by_its_store_name():
    model = nn.Module()
    model.norm = nn.LayerNorm(4)
    layers = hooks.parse_layers(["norm", "norm@input"], model, "mean", layer_reductions={"norm@input": "none"})
    assert [(sel.store_name, sel.reduction) for sel in layers] == [("norm", "mean"), ("norm@input", "none")]
    layers = hooks.parse_layers(["norm", "norm@input"], model, "mean", layer_reductions={"norm": [0]})  # both captures
    assert [(sel.store_name, sel.reduction) for sel in layers] == [("norm", [0]), ("norm@input", [0])]

@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
@pytest.mark.parametrize("autocast", [None, "float16", "bfloat16"])
def test_a_bfloat16_store_of_any_activations_holds_their_bfloat16_bits(tmp_path, device, autocast):
    # the kernels only copy into bfloat16: float32 and float16 activations are converted first
    torch.manual_seed(0)
    result = extract(options(tmp_path, layers=["z_proj", "encoder_blocks.1"], dtype="bfloat16", device=device,
                             autocast=autocast))
    ref = reference_activations(tmp_path, ["z_proj", "encoder_blocks.1"], device, keep=lambda o: o.to(torch.bfloat16),
                                autocast=getattr(torch, autocast) if autocast else None)
    with open_store(result.path) as s:
        for name, parts in ref.items():
            assert s.layers[name].attrs["encoding"] == "bfloat16-bits"
            assert s.read(name).tobytes() == torch.cat(parts).view(torch.int16).numpy().tobytes(), name
        assert s.layers["z_proj"].attrs["source_dtype"] == {None: "float32", "float16": "float16", "bfloat16": "bfloat16"}[autocast]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_a_tensor_the_model_changes_in_place_is_stored_as_its_hook_saw_it(tmp_path, device):
    # The norm's output goes through ReLU(inplace=True), and the ReLU's input is that same tensor;
    # the copy to the host comes after the forward, so the hook keeps a copy of its own (of the
    # first token alone, a view, with --reduction first).
    from helpers.inplace import build, tokens

    torch.manual_seed(0)
    model = build().to(device).eval()
    seen: dict[str, list] = {}
    for name in ("0.norm", "1.norm", "0.fc"):
        model.get_submodule(name).register_forward_hook(lambda m, a, o, n=name: seen.setdefault(n, []).append(o.half().cpu()))
    model.get_submodule("0.relu").register_forward_pre_hook(lambda m, a: seen.setdefault("0.relu@input", []).append(a[0].half().cpu()))
    with torch.inference_mode():
        for batch in torch.utils.data.DataLoader(tokens(), batch_size=4):
            model(batch.to(device))
    for reduction in ("none", "first"):
        path = extract(ExtractOptions(out=str(tmp_path / f"{reduction}.h5"), model="helpers.inplace:build",
                                      dataset="helpers.inplace:tokens", layers=["*.norm", "0.fc", "0.relu@input"],
                                      batch_size=4, reduction=reduction, progress=False, device=device)).path
        with open_store(path) as s:
            assert list(s.layers) == ["0.norm", "1.norm", "0.fc", "0.relu@input"]
            for name, parts in seen.items():
                want = torch.cat(parts) if reduction == "none" else torch.cat(parts)[:, 0]
                assert s.read(name).tobytes() == want.numpy().tobytes(), (reduction, name)
            assert (s.read("0.norm") < 0).any()  # as before the ReLU


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_autocast_runs_the_forward_in_mixed_precision(tmp_path, device):
    # z_proj is a Linear: bfloat16 under autocast; its bytes as a plain hook under autocast sees them
    torch.manual_seed(0)
    result = extract(options(tmp_path, layers=["z_proj", "encoder_blocks.1"], autocast="bfloat16", device=device))
    ref = reference_activations(tmp_path, ["z_proj", "encoder_blocks.1"], device, autocast=torch.bfloat16)
    plain = reference_activations(tmp_path, ["z_proj"], device)
    with open_store(result.path) as s:
        assert s.layers["z_proj"].attrs["source_dtype"] == "bfloat16"
        for name, parts in ref.items():
            assert s.read(name).tobytes() == torch.cat(parts).numpy().tobytes(), name
        assert s.read("z_proj").tobytes() != torch.cat(plain["z_proj"]).numpy().tobytes()  # not the float32 run
        assert s.metadata["options"]["autocast"] == "bfloat16"
    # token means of bfloat16 activations: summed in float32 and rounded once, to float16 (on a GPU
    # by the ring's kernel). The reference sums as the hook does: a reduction over a float32 copy
    # of the tokens may add them in another order on a GPU.
    torch.manual_seed(0)
    means = extract(options(tmp_path, out=str(tmp_path / "means.h5"), layers=["z_proj"], autocast="bfloat16",
                            reduction="mean", device=device))
    ref = reference_activations(tmp_path, ["z_proj"], device, autocast=torch.bfloat16,
                                keep=lambda o: o.flatten(1, -2).mean(1, dtype=torch.float32).to(torch.float16))
    with open_store(means.path) as s:
        assert s.layers["z_proj"].attrs["source_dtype"] == "bfloat16"  # the module's, not its mean's
        assert s.read("z_proj").tobytes() == torch.cat(ref["z_proj"]).numpy().tobytes()
    with pytest.raises(ExtractError, match=r"^--autocast 'float64': use bfloat16 or float16$"):
        extract(options(tmp_path, out=str(tmp_path / "x.h5"), autocast="float64"))


RECORDED: list[torch.Tensor] = []


def recording_forward(model, batch):
    """policy_forward, also keeping encoder_blocks.1's output as a plain hook sees it."""
    handle = model.encoder_blocks[1].register_forward_hook(lambda m, a, o: RECORDED.append(o.to(torch.float16)))
    try:
        return policy_forward(model, batch)
    finally:
        handle.remove()


def test_forward_outputs_are_kept_per_batch(tmp_path):
    from marstore.extract import forward_scalars

    def normalize_output(out, names=(), left_out=None):  # the scalars' values, as the store gets them
        return {name: float(v) for name, v in forward_scalars(out, names, left_out).items()}

    t = torch.tensor
    assert normalize_output(t(1.5)) == {"loss": 1.5}
    assert normalize_output((t(3.0), t(1.0), t(2.0))) == {"loss": 3.0, "loss_1": 1.0, "loss_2": 2.0}
    assert normalize_output((t(3.0), (t(1.0), t(2.0)))) == {"loss": 3.0, "loss_1_0": 1.0, "loss_1_1": 2.0}
    left_out: dict[str, str] = {}
    assert normalize_output({"total": t(1.0), "logits": torch.zeros(2, 3), "ids": ["a"], "x": None}, (), left_out) == {"total": 1.0}
    assert left_out == {"logits": "a tensor of shape (2, 3)", "ids_0": "a str", "x": "None"}
    left_out.clear()
    assert normalize_output(torch.zeros(4, 3), (), left_out) == {} and left_out == {"the return value": "a tensor of shape (4, 3)"}
    normalize_output(torch.zeros(4, 5), (), left_out)  # said once a run, whatever its shape in later batches
    assert left_out == {"the return value": "a tensor of shape (4, 3)"}
    assert normalize_output({"train/loss": t(1.0), "parts": {"a/b": 2}}) == {"train.loss": 1.0, "parts.a.b": 2.0}
    named = ["loss", "video_loss", "act_loss"]
    assert normalize_output((t(3.0), (t(1.0), t(2.0))), named) == {"loss": 3.0, "video_loss": 1.0, "act_loss": 2.0}
    assert normalize_output(t(1.5), ["total"]) == {"total": 1.5}
    with pytest.raises(ExtractError, match=r"^--output-names gives 3 names \(loss video_loss act_loss\) but the forward "
                                           r"returned 2 scalar values \(loss, loss_1\); give one name for each$"):
        normalize_output((t(3.0), t(1.0), torch.zeros(4)), named)
    with pytest.raises(ExtractError, match=r"^--output-names: the forward returned a dict, whose keys \(total\) name"):
        normalize_output({"total": t(1.0)}, ["loss"])
    # a namedtuple or a dataclass names its fields (a namedtuple used to give loss, loss_1, ...)
    Losses = collections.namedtuple("Losses", "loss video_loss act_loss")
    assert normalize_output(Losses(t(3.0), t(1.0), t(2.0))) == {"loss": 3.0, "video_loss": 1.0, "act_loss": 2.0}

    @dataclasses.dataclass
    class Output:
        loss: torch.Tensor
        logits: torch.Tensor
        parts: dict

    left_out.clear()
    assert normalize_output(Output(t(1.0), torch.zeros(2, 3), {"a": t(0.5)}), (), left_out) == {"loss": 1.0, "parts.a": 0.5}
    assert left_out == {"logits": "a tensor of shape (2, 3)"}
    with pytest.raises(ExtractError, match=r"^--output-names: the forward returned a Losses, whose keys \(loss, video_loss, "
                                           r"act_loss\) name its values already"):
        normalize_output(Losses(t(3.0), t(1.0), t(2.0)), named)
    with pytest.raises(ExtractError, match=r"^the forward returned an output named row_start"):
        normalize_output({"row_start": t(1.0)})

    result = extract(options(tmp_path))
    assert set(result.outputs) == {"loss", "loss_1", "loss_2"} and result.outputs["loss"]["nonfinite"] == 0
    with open_store(result.path) as s:
        out = s.file["outputs"]
        assert out["row_start"][:].tolist() == [0, 8, 16, 24, 32]
        assert out["loss_1"][:].tolist() == [0.0] * 5  # policy mode: no video loss
        assert np.allclose(out["loss"][:], out["loss_2"][:])
        unnamed = {name: out[name][:] for name in ("loss", "loss_1", "loss_2")}
    result = extract(options(tmp_path, out=str(tmp_path / "named.h5"), output_names=named))
    assert list(result.outputs) == named
    with open_store(result.path) as s:
        out = s.file["outputs"]
        assert list(out) == ["row_start", "loss", "video_loss", "act_loss"]  # the forward's order
        for name, before in zip(named, unnamed.values()):
            assert out[name][:].tobytes() == before.tobytes()


@pytest.mark.parametrize("names, message", [
    (["loss", "loss"], r"loss given twice"),
    (["loss", "row_start"], r"'row_start' cannot name an HDF5 dataset"),
    (["loss", "video/loss"], r"'video/loss' cannot name an HDF5 dataset"),
])
def test_bad_output_names_are_refused_before_the_store_is_made(tmp_path, names, message):
    with pytest.raises(ExtractError, match=r"^--output-names .*" + message):
        extract(options(tmp_path, output_names=names))
    assert not (tmp_path / "s.h5").exists()


def test_output_names_that_do_not_fit_the_forward_stop_the_first_batch(tmp_path):
    with pytest.raises(ExtractError, match=r"^--output-names gives 2 names \(loss video_loss\) but the forward returned 3"):
        extract(options(tmp_path, output_names=["loss", "video_loss"]))
    assert not (tmp_path / "s.h5").exists()  # the store is made from the first batch's shapes


def test_ragged_layers_from_the_masked_encoder(tmp_path):
    RECORDED.clear()
    result = extract(options(tmp_path, layers=["encoder_blocks.1", "decoder_norm"], forward="test_extract:recording_forward",
                             model_args={**CONFIG, "drop_masked": True}))
    with open_store(result.path) as s:
        assert s.layers["encoder_blocks.1"].layout == "ragged" and s.layers["decoder_norm"].layout == "dense"
        rows = s.read("encoder_blocks.1")
        expected = [r for part in RECORDED for r in part]
        assert len(rows) == len(expected) == 40
        assert len({r.shape[0] for r in rows}) > 1  # the token count varies between batches
        assert all(a.tobytes() == b.numpy().tobytes() for a, b in zip(rows, expected))
    # under autocast too (the decoder puts bfloat16 tokens among the float32 mask tokens)
    result = extract(options(tmp_path, out=str(tmp_path / "amp.h5"), layers=["encoder_blocks.1"], autocast="bfloat16",
                             model_args={**CONFIG, "drop_masked": True}))
    with open_store(result.path) as s:
        assert s.layers["encoder_blocks.1"].layout == "ragged" and s.rows == 40


def test_a_methods_return_value_is_stored_as_a_layer(tmp_path):
    """MAR's mask comes from a method (random_masking), not from any module's output:
    'random_masking()' stores it, row by row beside the layers, and it is the mask the forward
    used: each row's kept tokens are the encoder's, and the decoder's input holds the mask token
    exactly where it says."""
    from marstore.extract import extract_from

    model = video_mar(**CONFIG, drop_masked=True).eval()
    data = synthetic_video_actions(size=24)
    layers = ["random_masking()", "encoder_blocks.1", "decoder_blocks.0@input"]
    result = extract_from(model, data, str(tmp_path / "m.h5"), layers, forward=policy_forward, batch_size=8)
    assert result.rows == 24 and hooks.hook_count(model) == 0 and "random_masking" not in vars(model)
    with open_store(result.path) as s:
        assert list(s.layers) == layers and s.metadata["state_changes"] == []  # the wrapper is no state of the model's
        mask, tokens, decoder_in = s.read("random_masking()"), s.read("encoder_blocks.1"), s.read("decoder_blocks.0@input")
        assert mask.shape == (24, 64) and set(np.unique(mask).tolist()) <= {0.0, 1.0}
        assert s.layers["random_masking()"].attrs["source_dtype"] == "float32"
    kept = (mask == 0).sum(1)
    assert kept.tolist() == [len(t) for t in tokens] and len(set(kept[:8])) == 1  # one ratio a call
    assert len(set(kept.tolist())) > 1  # and another in another batch
    token = model.mask_token.detach().to(torch.float16).numpy().reshape(-1)
    for m, d in zip(mask, decoder_in):
        assert (d[m == 1] == token).all() and not (d[m == 0] == token).all(1).any()


def test_method_patterns_are_checked_and_the_wrapper_goes_with_the_capture():
    model = video_mar(**CONFIG, drop_masked=True)
    for pattern, message in (
        ("random_maskin()", "layer pattern 'random_maskin()': VideoActionMAR (the model) has no method 'random_maskin'; "
                            "its methods: ['random_masking']"),
        ("nope()", "layer pattern 'nope()': VideoActionMAR (the model) has no method 'nope'; its methods: "
                   "['forward', 'sample_frames', 'sample_orders', 'random_masking']"),
        ("encoder_blocks()", "layer pattern 'encoder_blocks()': encoder_blocks is a module, not a method; hook it as "
                             "'encoder_blocks' (or its input as 'encoder_blocks@input')"),
        ("encoder_blocks.*.forward()", "layer pattern 'encoder_blocks.*.forward()': a method is named exactly, as "
                                       "MODULE.METHOD() or METHOD() for the model's own"),
        ("diffloss.forwrd()", "layer pattern 'diffloss.forwrd()': DiffHead (diffloss) has no method 'forwrd'; its "
                              "methods: ['forward']"),
        ("random_masking()@input", "layer pattern 'random_masking()@input': a method's return value is captured, not "
                                   "its arguments; drop '@input' (the module that gives them can be hooked)"),
    ):
        with pytest.raises(hooks.HookError) as info:
            hooks.parse_layers([pattern], model)
        assert str(info.value) == message
    with pytest.raises(hooks.HookError, match=r"^layer pattern 'decodr\.forward\(\)': the model has no module 'decodr'; "):
        hooks.parse_layers(["decodr.forward()"], model)
    # an instance attribute of that name (another tool's wrapper) is put back, on an error too
    theirs = model.random_masking
    model.random_masking = theirs
    (sel,) = hooks.parse_layers(["random_masking():0"], model)
    assert (sel.name, sel.method, sel.store_name, sel.label) == ("", "random_masking", "random_masking():0", "random_masking()")
    batch = default_collate([synthetic_video_actions(size=2)[i] for i in range(2)])
    with pytest.raises(hooks.HookError, match=r"^random_masking\(\):0: the return of random_masking\(\) is a tensor"):
        with hooks.Capture(model, [sel]) as capture, torch.inference_mode():
            assert hooks.hook_count(model) == 1
            capture.start_batch(2)
            policy_forward(model, batch)
    assert hooks.hook_count(model) == 0 and vars(model)["random_masking"] is theirs

    class Pair(nn.Module):
        def forward(self, x):
            return self.halves(self.doubled(x))[0]

        def halves(self, x):
            return x[:, :2], x[:, 2:]

        @staticmethod
        def doubled(x):
            return 2 * x

    pair = Pair()
    sels = hooks.parse_layers(["halves():0", "halves():1", "doubled()"], pair)  # one method wrapped twice; a static one
    with hooks.Capture(pair, sels) as capture:
        assert hooks.hook_count(pair) == 2  # the methods, wrapped (one twice)
        capture.start_batch(3)
        pair(torch.arange(12.0).reshape(3, 4) / 2)
        got = capture.finish_batch()
    assert [got[n].tolist() for n in ("halves():0", "halves():1")] == [[[0, 1], [4, 5], [8, 9]], [[2, 3], [6, 7], [10, 11]]]
    assert got["doubled()"].flatten().tolist() == list(range(12))
    assert hooks.hook_count(pair) == 0 and not {"halves", "doubled"} & set(vars(pair))
    with pytest.raises(hooks.HookError, match=r"^layer pattern 'halve\(\)': Pair \(the model\) has no method 'halve'; "
                                              r"its methods: \['halves'\]$"):
        hooks.parse_layers(["halve()"], pair)


class Typed(nn.Module):
    """A linear layer whose output `out` gives in the dtype asked (float64, a bool mask, integers)."""

    def __init__(self, dtype):
        super().__init__()
        self.lin, self.out, self.dtype = nn.Linear(4, 3), nn.Identity(), dtype

    def forward(self, x):
        y = self.lin(x.double()) * 1e5 if self.dtype == torch.float64 else self.lin(x)
        return self.out(y > 0 if self.dtype == torch.bool else y.to(self.dtype)).float().sum()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bool])
def test_float64_and_bool_captures_are_stored_through_float32(tmp_path, dtype):
    """The kernels take float32, bfloat16 and float16; a float64 capture (a model run in double
    precision) and a bool mask become float32 on the device first, recorded as their own dtype."""
    from marstore.extract import extract_from

    torch.manual_seed(0)
    model = Typed(dtype).double() if dtype == torch.float64 else Typed(dtype)
    data = [torch.randn(4) for _ in range(12)]
    result = extract_from(model, data, str(tmp_path / "t.h5"), "out", batch_size=4)
    reference = torch.stack([model.out(model.lin(x.double()) * 1e5 if dtype == torch.float64 else model.lin(x) > 0)
                             for x in data]).detach()
    with open_store(result.path) as s:
        assert s.read("out").tobytes() == reference.float().half().numpy().tobytes()
        assert s.layers["out"].attrs["source_dtype"] == str(dtype).removeprefix("torch.")
        overflow = int((reference.float().abs() >= 65520).sum())  # past float16's range: counted
        assert s.layers["out"].attrs["overflow"] == overflow and (overflow > 0) == (dtype == torch.float64)


def test_integer_and_complex_captures_are_refused_before_anything_is_written(tmp_path):
    from marstore.extract import extract_from

    for dtype, name in ((torch.int64, "int64"), (torch.complex64, "complex64")):
        with pytest.raises(hooks.HookError) as info:
            extract_from(Typed(dtype), [torch.randn(4) for _ in range(8)], str(tmp_path / "t.h5"), "out", batch_size=4)
        assert str(info.value) == (f"out: the output of out holds {name} values; marstore stores floating-point values "
                                   "(float32, bfloat16, float16, float64) and bool masks, not integers or complex "
                                   "numbers: hook a module that gives floats")
        assert not (tmp_path / "t.h5").exists()
    # the dry run names it among the others, and --exclude-layers leaves a method out by its name
    model = video_mar(**CONFIG, drop_masked=True)
    assert [s.label for s in hooks.parse_layers(["sample_orders()", "random_masking()", "encoder_blocks.*"], model,
                                                exclude=["sample_orders()"])] == [
        "random_masking()", "encoder_blocks.0", "encoder_blocks.1"]


class TokensLater(nn.Module):
    """Two tokens of each (batch, 3, 8) item in its first two calls, all three after."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.fc(x if self.calls > 2 else x[:, :2])


class TokensGrow(torch.utils.data.Dataset):
    """{"x": 2 tokens of 8 features for the first 8 items, 3 after}: a token count that changes
    after the first two batches of 4, with the data (so a resumed run sees what a fresh one does).
    grows="even": only the even items grow (under torchrun, only rank 0 of 2 sees a change)."""

    def __init__(self, grows: str = "all"):
        self.grows = grows

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> dict:
        tokens = 3 if i >= 8 and (self.grows == "all" or i % 2 == 0) else 2
        return {"x": torch.randn(tokens, 8, generator=torch.Generator().manual_seed(i)), "label": i % 3}


class OneLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x)


def test_a_layer_whose_tokens_change_after_the_first_batches_is_rewritten_ragged_and_the_run_goes_on(tmp_path, caplog,
                                                                                                      capsys):
    kw = dict(model="test_extract:OneLinear", dataset="test_extract:TokensGrow", layers=["fc", "fc@input"], targets=["label"],
              batch_size=4, commit_rows=4, progress=False, device="cpu")
    fresh = extract(ExtractOptions(out=str(tmp_path / "fresh.h5"), ragged=["fc"], **kw))  # ragged from the start

    def same_as_fresh(path):
        with open_store(path) as s, open_store(fresh.path) as f:
            assert s.status == "complete" and s.rows == 16 and "converting" not in s.file
            for name in ("fc", "fc@input"):
                assert s.layers[name].layout == "ragged" and [len(r) for r in s.read(name)] == [2] * 8 + [3] * 8
                assert [r.tobytes() for r in s.read(name)] == [r.tobytes() for r in f.read(name)]
                assert np.allclose(s.layers[name].attrs["mean"], f.layers[name].attrs["mean"], atol=1e-6)
                assert s.layers[name].attrs["nonfinite"] == 0
            assert np.array_equal(s.target("label"), f.target("label")) and np.array_equal(s.index(), f.index())
            return s.metadata["options"]["ragged"]

    # the first two batches (2 tokens) store both captures dense; the third (3 tokens) has them rewritten
    result = extract(ExtractOptions(out=str(tmp_path / "s.h5"), **kw))
    assert result.rows == 16 and result.layers["fc"]["layout"] == "ragged"
    assert same_as_fresh(result.path) == ["fc", "fc@input"]  # recorded, so that a resume agrees
    with open_store(result.path) as s, open_store(fresh.path) as f:
        assert s.layers["fc"].attrs["rewritten_at_row"] == 8 and "rewritten_at_row" not in f.layers["fc"].attrs

    assert main(["info", result.path]) == 0
    assert "reduction none, rewritten ragged at row 8) chunks" in capsys.readouterr().out
    assert ("fc, fc@input: a batch gave rows of 3 tokens where the first batches gave 2, and they were stored dense; "
            "rewriting the 8 rows stored so far ragged, then going on (--ragged fc stores them ragged from the start)"
            ) in caplog.text
    # a run stopped before the change, resumed with --ragged: its rows are rewritten at the resume
    out = tmp_path / "stopped.h5"

    def stop(rows):
        if rows >= 8:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted):
        extract(ExtractOptions(out=str(out), **kw), on_batch=stop)
    with open_store(out) as s:
        assert s.rows == 8 and s.layers["fc"].layout == "dense"
    assert same_as_fresh(extract(ExtractOptions(out=str(out), ragged=["fc"], resume=True, **kw)).path) == ["fc"]
    assert "--resume: --ragged names fc, fc@input, which " in caplog.text
    with pytest.raises(ExtractError, match=r"--resume: .* is already complete \(16 rows\)"):  # the record matches now
        extract(ExtractOptions(out=str(out), ragged=["fc"], resume=True, **kw))


@pytest.mark.parametrize("cut", ["dense gone", "record behind"])
def test_a_rewrite_cut_inside_its_swap_is_finished_by_the_resume(tmp_path, caplog, cut):
    import shutil

    from marstore.store import convert_to_ragged

    kw = dict(model="test_extract:OneLinear", dataset="test_extract:TokensGrow", layers=["fc"], targets=["label"],
              batch_size=4, commit_rows=4, progress=False, device="cpu")
    with caplog.at_level("INFO", logger="marstore"):
        fresh = extract(ExtractOptions(out=str(tmp_path / "fresh.h5"), ragged=["fc"], **kw))
    # the third batch's tokens outgrow the slots sized from the first
    assert [m for m in caplog.messages if m.startswith("transfer ring")] == [
        "transfer ring: 4 slots of 128 bytes, the first batch's size (pageable memory)",
        "transfer ring: a batch needs 192 bytes, more than a slot's 128 bytes: slots made anew, a quarter larger than that",
        "transfer ring: 4 slots of 256 bytes, as reserved (pageable memory)"]

    def stop(rows):
        if rows >= 8:
            raise KeyboardInterrupt

    out, done = tmp_path / "s.h5", tmp_path / "done.h5"
    with pytest.raises(Interrupted):
        extract(ExtractOptions(out=str(out), **kw), on_batch=stop)
    shutil.copyfile(out, done)
    convert_to_ragged(done, ["fc"])
    with h5py.File(out, "r+") as f, h5py.File(done, "r") as g:  # the states a kill inside the swap leaves
        del f["activations/fc"]
        if cut == "dense gone":  # the ragged group still waits in /converting
            g.copy(g["activations/fc"], f.require_group("converting"), "fc")
        else:  # moved in, the layer's record not yet updated
            g.copy(g["activations/fc"], f["activations"], "fc")
    with open_store(out) as s:
        assert s.rows == 8 and s.cut_short == (["fc"] if cut == "dense gone" else [])
    result = extract(ExtractOptions(out=str(out), resume=True, **kw))
    with open_store(result.path) as s, open_store(fresh.path) as f:
        assert s.status == "complete" and s.layers["fc"].layout == "ragged" and "converting" not in s.file
        assert [r.tobytes() for r in s.read("fc")] == [r.tobytes() for r in f.read("fc")]
    assert "finished rewriting layer fc ragged, which a stopped process had left half done" in caplog.text


def test_a_layer_that_cannot_be_stored_ragged_is_not_rewritten(tmp_path, monkeypatch):
    import marstore.store
    from marstore.store import convert_to_ragged

    path = tmp_path / "s.h5"
    with StoreWriter(path, [LayerSpec("means", (8,)), LayerSpec("tokens", (2, 8))]) as writer:
        writer.append({"means": np.zeros((4, 8), np.float16), "tokens": np.arange(64, dtype=np.float16).reshape(4, 2, 8)},
                      index=range(4))
    with pytest.raises(StoreError, match=rf"^{path}: layer 'means' has rows of shape \(8,\), not \(tokens, features...\): "):
        convert_to_ragged(path, ["means"])
    with pytest.raises(StoreError, match=rf"^{path} has no layer 'nope'; it has \['means', 'tokens'\]$"):
        convert_to_ragged(path, ["nope"])
    with monkeypatch.context() as m:  # a disk that cannot take the copy: refused before anything is written
        m.setattr(marstore.store, "room_left", lambda path, size: (100, "free on its filesystem"))
        with pytest.raises(StoreError) as info:
            convert_to_ragged(path, ["tokens"])
        need = human_bytes(os.path.getsize(path))  # a copy of the store
        assert str(info.value) == (f"{path}: rewriting tokens ragged writes a new copy of the store, about {need}, but "
                                   "only 100 bytes are free on its filesystem; make room, then resume")
    with open_store(path) as s:
        assert s.layers["tokens"].layout == "dense" and "converting" not in s.file
    with h5py.File(path, "r+") as f:  # what an earlier version's conversion killed halfway leaves
        f.create_group("converting/tokens")
    with open(f"{path}.rewrite", "wb") as f:  # and what this version's leaves
        f.write(b"half a file")
    convert_to_ragged(path, ["tokens"])
    assert os.listdir(tmp_path) == ["s.h5"]
    with open_store(path) as s:
        assert "converting" not in s.file and s.layers["tokens"].layout == "ragged" and s.layers["tokens"].row_shape == (8,)
        assert [r.tobytes() for r in s.read("tokens")] == [np.arange(16 * i, 16 * i + 16, dtype=np.float16).reshape(2, 8).tobytes()
                                                           for i in range(4)]
        assert s.layers["means"].layout == "dense"


class PaddedEncoder(nn.Module):
    """nn.TransformerEncoder as text and action models use it: with a padding mask, in eval and
    inference mode, its layers take torch's fast path and give nested tensors, one component a
    sample over its own tokens. A batch with nothing padded runs without a mask (dense tensors)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 16)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2)

    def forward(self, tokens, padding):
        return self.encoder(self.embed(tokens), src_key_padding_mask=padding if padding.any() else None)


class PaddedTokens(torch.utils.data.Dataset):
    """24 items of 10 token ids, item i's first 3 + i % 7 real (count), the rest padding; late=True:
    the first 8 items unpadded (the first two batches of 4 run without a mask); item `empty` all
    padding."""

    def __init__(self, late: bool = False, empty: int | None = None):
        self.late, self.empty = late, empty

    def __len__(self) -> int:
        return 24

    def __getitem__(self, i: int) -> dict:
        n = 10 if self.late and i < 8 else 0 if i == self.empty else 3 + i % 7
        return {"tokens": torch.randint(0, 50, (10,), generator=torch.Generator().manual_seed(i)),
                "padding": torch.arange(10) >= n, "label": i % 3, "count": float(n)}


def nested_reference(layer: str, data: PaddedTokens, batch_size: int = 4) -> list[torch.Tensor]:
    """Each sample's tokens at the layer's output as a plain hook sees them."""
    model, rows = PaddedEncoder().eval(), []

    def keep(module, args, output):
        parts = output.unbind() if output.is_nested else list(output)
        rows.extend(p.clone() for p in parts)

    handle = model.get_submodule(layer).register_forward_hook(keep)
    with torch.inference_mode():
        for start in range(0, len(data), batch_size):
            batch = default_collate([data[i] for i in range(start, min(start + batch_size, len(data)))])
            model(batch["tokens"], batch["padding"])
    handle.remove()
    return rows


def test_a_nested_tensor_is_stored_ragged_each_sample_over_its_own_tokens(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    data = PaddedTokens()
    result = extract_from(PaddedEncoder(), data, str(tmp_path / "s.h5"), ["encoder.layers.*"], targets=["label"],
                          batch_size=4, progress=False)
    expected = [e.half() for e in nested_reference("encoder.layers.1", data)]
    with open_store(result.path) as s:
        assert s.rows == 24 and [s.layers[n].layout for n in s.layers] == ["ragged", "ragged"]
        rows = s.read("encoder.layers.1")
        assert [len(r) for r in rows] == [3 + i % 7 for i in range(24)]
        assert [r.tobytes() for r in rows] == [e.numpy().tobytes() for e in expected]
        assert s.file["activations/encoder.layers.1/offsets"][:6].tolist() == [0, 3, 7, 12, 18, 25]
        assert s.layers["encoder.layers.0"].attrs["nonfinite"] == 0
    assert ("encoder.layers.0: samples of different lengths (a nested tensor or a packed sequence): stored ragged"
            in caplog.text)
    # a reduction reads each sample's own tokens, never the zeros of its padding
    for reduction, of in (("last", lambda e: e[-1]), ("first", lambda e: e[0])):
        result = extract_from(PaddedEncoder(), data, str(tmp_path / f"{reduction}.h5"), ["encoder.layers.1"],
                              reduction=reduction, batch_size=4, progress=False)
        with open_store(result.path) as s:
            assert s.layers["encoder.layers.1"].layout == "dense"
            assert s.read("encoder.layers.1").tobytes() == torch.stack([of(e) for e in expected]).numpy().tobytes()
    result = extract_from(PaddedEncoder(), data, str(tmp_path / "mean.h5"), ["encoder.layers.1"], reduction="mean",
                          batch_size=4, progress=False)
    means = torch.stack([e.mean(0) for e in nested_reference("encoder.layers.1", data)]).half()
    with open_store(result.path) as s:  # the float32 sums' order is the kernel's: one float16 step of leeway
        np.testing.assert_array_max_ulp(s.read("encoder.layers.1"), means.numpy(), maxulp=1)
    with pytest.raises(hooks.HookError, match=r"^encoder.layers.1: token index \[3\] is out of range for 3 tokens; "):
        extract_from(PaddedEncoder(), data, str(tmp_path / "index.h5"), ["encoder.layers.1"], reduction="3",
                     batch_size=4, progress=False)
    # a sample of padding alone: no tokens stored, a mean of none (NaN, counted), no first token
    empty = PaddedTokens(empty=2)
    result = extract_from(PaddedEncoder(), empty, str(tmp_path / "empty.h5"), ["encoder.layers.1"], batch_size=4,
                          progress=False)
    with open_store(result.path) as s:
        assert [len(r) for r in s.read("encoder.layers.1")][:4] == [3, 4, 0, 6]
    result = extract_from(PaddedEncoder(), empty, str(tmp_path / "empty_mean.h5"), ["encoder.layers.1"], reduction="mean",
                          batch_size=4, progress=False)
    with open_store(result.path) as s:
        assert np.isnan(s.read("encoder.layers.1")).any(axis=1).tolist() == [i == 2 for i in range(24)]
        assert s.layers["encoder.layers.1"].attrs["nonfinite"] == 16
    with pytest.raises(hooks.HookError) as info:
        extract_from(PaddedEncoder(), empty, str(tmp_path / "empty_first.h5"), ["encoder.layers.1"], reduction="first",
                     batch_size=4, progress=False)
    assert str(info.value) == ("encoder.layers.1: reduction 'first' takes a token, and a sample has none; leave it out of "
                               "--layers, or store it whole: --layer-reduction encoder.layers.1=none")


def test_a_nested_tensor_after_dense_batches_is_rewritten_ragged_and_a_dry_run_says_what_it_gives(tmp_path, caplog):
    survey = extract_from(PaddedEncoder(), PaddedTokens(), "", ["encoder.layers.0"], batch_size=4, dry_run=True,
                          progress=False)
    assert survey.describe().splitlines()[4] == ("encoder.layers.0  TransformerEncoderLayer      1  NestedTensor(4, 3-6, 16)"
                                                 " float32  3-9 tokens of (16,) float16, ragged (from float32)")
    layer = survey.layers[0]
    assert (layer.tokens, layer.mean_tokens, layer.lengths, layer.problem) == ((3, 9), 5.625, [3, 4, 5, 6], None)
    late = PaddedTokens(late=True)  # the first two batches pad nothing: they run without a mask, dense
    survey = extract_from(PaddedEncoder(), late, "", ["encoder.layers.1"], batch_size=4, dry_run=4, progress=False)
    assert (survey.layers[0].tokens, survey.layers[0].ragged_from, survey.problems()) == ((3, 10), 3, [])
    result = extract_from(PaddedEncoder(), late, str(tmp_path / "s.h5"), ["encoder.layers.1"], batch_size=4,
                          progress=False)
    assert ("encoder.layers.1: a batch gave samples of different lengths (a nested tensor or a packed sequence) where "
            "the first batches gave dense rows, and they were stored dense; rewriting the 8 rows stored so far ragged, then going on "
            "(--ragged encoder.layers.1 stores them ragged from the start)") in caplog.text
    expected = [e.half() for e in nested_reference("encoder.layers.1", late)]
    with open_store(result.path) as s:
        layer = s.layers["encoder.layers.1"]
        assert (layer.layout, layer.attrs["rewritten_at_row"], s.metadata["options"]["ragged"]) == (
            "ragged", 8, ["encoder.layers.1"])
        assert [r.tobytes() for r in s.read("encoder.layers.1")] == [e.numpy().tobytes() for e in expected]
        assert layer.attrs["stats_count"][0] == sum(len(e) for e in expected) == 173  # no padding in the statistics


class Nested(nn.Module):
    """Gives a nested tensor of (x's rows cut to `tokens` each): rows of other feature sizes
    where `features` differ; called `calls` times in a forward."""

    def __init__(self, tokens=(2, 5, 3), features=None):
        super().__init__()
        self.tokens, self.features = tokens, features or [4] * len(tokens)

    def forward(self, x):
        return torch.nested.nested_tensor([x[i, :n, :f] for i, (n, f) in enumerate(zip(self.tokens, self.features))])


class NestedTwice(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.inner = Nested(**kw)

    def forward(self, x):
        return self.inner(x), self.inner(x)


def test_a_nested_capture_is_padded_for_the_transfer_or_refused_in_one_line():
    x = torch.randn(3, 6, 4)
    model = NestedTwice()
    with hooks.Capture(model, hooks.parse_layers(["inner"], model), multi_fire="last") as cap:
        cap.start_batch(3)
        model(x)
        padded = cap.finish_batch()["inner"]
        assert cap.lengths == {"inner": [2, 5, 3]} and tuple(padded.shape) == (3, 5, 4)
        assert all(torch.equal(padded[i, :n], x[i, :n]) and not padded[i, n:].any() for i, n in enumerate((2, 5, 3)))

    def refused(model, error, rows=3, **kw):
        with hooks.Capture(model, hooks.parse_layers(["inner"], model, **kw.pop("parse", {})), **kw) as cap:
            cap.start_batch(rows)
            with pytest.raises(hooks.HookError) as info:
                model(x)
                cap.finish_batch()
            assert str(info.value) == error

    refused(NestedTwice(), "inner gives samples of different lengths, whose firings cannot be stacked (--multi-fire "
            "stack): choose first or last, or reduce its tokens (--reduction)", multi_fire="stack")
    refused(NestedTwice(), "inner: a nested tensor of 3 sequences for a batch of 6 samples; marstore stores one sequence "
            "a sample: hook a module that keeps the batch", rows=6, multi_fire="first")
    refused(NestedTwice(features=[4, 3, 4]), "inner: the output of inner is a nested tensor whose samples have shapes "
            "[(2, 4), (3, 4), (5, 3)]; marstore takes nested samples of (tokens, ...) that differ only in their token "
            "count: hook another module", multi_fire="first")
    refused(NestedTwice(), "inner: the output of inner is a nested tensor, taken as (samples, tokens, ...): leave out "
            "--channels-first and --unfold-batch for it", multi_fire="first", parse={"channels_first": True})


def test_a_dry_run_of_several_batches_sees_what_the_first_batches_decide(tmp_path, capsys):

    kw = dict(out="", model="test_extract:TokensLater", dataset="helpers.inplace:tokens", layers=["fc"], batch_size=4,
              progress=False, device="cpu")
    # two batches agree, as the run's first two do: stored dense, as the run would
    assert extract(ExtractOptions(dry_run=2, **kw)).layers[0].row == (2, 8)
    survey = extract(ExtractOptions(dry_run=4, **kw))
    assert (survey.batches, survey.rows, survey.planned) == (4, 16, 16)
    # the third batch changes the count: the run will rewrite the layer ragged there, which stops nothing
    fc = survey.layers[0]
    assert (fc.row, fc.tokens, fc.mean_tokens, fc.ragged_from, fc.problem, survey.problems()) == ((8,), (2, 3), 2.5, 3, None, [])
    text = survey.describe().splitlines()
    assert text[4] == "fc     Linear      1  Tensor(4, 2, 8) float32  2-3 tokens of (8,) float16, ragged from batch 3 (from float32)"
    assert ("token count changing after the first two batches had them stored dense: fc (batch 3); the run will rewrite "
            "their rows ragged then (--ragged fc stores them ragged from the start)") in text
    both = extract(ExtractOptions(dry_run=4, **{**kw, "layers": ["fc", "fc@input"]})).describe()
    assert "fc (batch 3), fc@input (batch 3); the run will rewrite their rows ragged then (--ragged fc stores them" in both
    with pytest.raises(hooks.HookError, match=r"^--ragged 'f' matches none of the layers --layers selects \(fc\)$"):
        extract(ExtractOptions(dry_run=4, ragged=["f"], **kw))
    fixed = extract(ExtractOptions(dry_run=4, ragged=["f*"], **kw))  # a pattern, as --layers takes them
    fc = fixed.layers[0]
    assert (fc.row, fc.tokens, fc.mean_tokens, fc.ragged_from, fixed.problems()) == ((8,), (2, 3), 2.5, None, [])
    assert fixed.row_bytes() == survey.row_bytes() == 40  # 2.5 tokens of 8 float16 values
    for ragged in ([], ["fc"]):  # rewritten at batch 3, or ragged from the start: the bytes the survey said
        result = extract(ExtractOptions(**{**kw, "out": str(tmp_path / f"s{len(ragged)}.h5")}, ragged=ragged))
        with open_store(result.path) as s:
            assert result.bytes == fixed.row_bytes() * s.rows and s.layers["fc"].layout == "ragged"
    # more batches asked than the data set has: all of them, said so
    assert main(["extract", "--model", "test_extract:TokensLater", "--dataset", "helpers.inplace:tokens", "--layers", "fc",
                 "--batch-size", "4", "--ragged", "fc", "--dry-run", "9"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == ("dry run: all 4 batches of the data set (16 samples; 9 asked) through the model, every selected "
                          "layer hooked; nothing written")
    assert printed[4] == "fc     Linear      1  Tensor(4, 2, 8) float32  2-3 tokens of (8,) float16, ragged (from float32)"
    with pytest.raises(ExtractError, match=r"^--dry-run 0: give the batches to survey, at least 1$"):
        ExtractOptions(dry_run=0, **kw)


class SkipsEvenCalls(nn.Module):
    """Its `extra` runs in odd calls only, as a module of one task mode does."""

    def __init__(self):
        super().__init__()
        self.fc, self.extra = nn.Linear(8, 8), nn.Linear(8, 8)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        h = self.fc(x)
        return {"loss": h.pow(2).mean(), "logits": self.extra(h) if self.calls % 2 else h}


class TagChanges(torch.utils.data.Dataset):
    """{"x": (3, 8), "tag": 2 numbers a sample for the first 8 items, 3 after}."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> dict:
        return {"x": torch.full((3, 8), float(i)), "tag": torch.zeros(2 if i < 8 else 3)}



def test_allow_missing_stores_nan_rows_where_a_module_does_not_fire_also_in_a_short_last_batch(tmp_path, caplog):
    # 16 items in batches of 5: `extra` skips the second and the last, of 1 row
    result = extract(ExtractOptions(out=str(tmp_path / "s.h5"), model="test_extract:SkipsEvenCalls",
                                    dataset="helpers.inplace:tokens", layers=["fc", "extra"], batch_size=5, progress=False,
                                    device="cpu", reduction="mean", allow_missing=True))
    with open_store(result.path) as s:
        assert s.rows == 16 and not np.isnan(s.read("fc")).any()
        assert np.isnan(s.read("extra")).all(axis=1).tolist() == [False] * 5 + [True] * 5 + [False] * 5 + [True]
        assert np.isnan(s.read("extra")).any(axis=1).tolist() == np.isnan(s.read("extra")).all(axis=1).tolist()
    assert caplog.text.count("extra did not fire in this batch: its rows are NaN") == 2

def test_a_dry_run_checks_the_targets_and_the_forward_return_and_modules_that_stop_firing(tmp_path, monkeypatch):
    kw = dict(out="", model="test_extract:SkipsEvenCalls", dataset="helpers.inplace:tokens", layers=["fc", "extra"],
              batch_size=4, progress=False, device="cpu", reduction="mean")
    survey = extract(ExtractOptions(dry_run=1, **kw))
    assert survey.problems() == [] and survey.outputs == ["loss"] and survey.left_out == {"logits": "a tensor of shape (4, 3, 8)"}
    survey = extract(ExtractOptions(dry_run=3, **kw))
    assert survey.problems() == [
        "extra did not fire in batch 2 (it fired in 2 of 3; some modules run only in some task modes): pass --allow-missing "
        "to store NaN rows where it does not fire, or leave it out"]
    assert extract(ExtractOptions(dry_run=3, allow_missing=True, **kw)).problems() == []
    survey = extract(ExtractOptions(**{**kw, "dataset": "test_extract:TagChanges"}, dry_run=4, allow_missing=True,
                                    targets=["tag"]))
    assert survey.problems() == ["--targets 'tag': batch 3 gives (3,) float32 a row, the first (2,) float32; a target "
                                 "keeps one shape (and numbers or text)"]
    # the built-in model: a target that is not in the batch, and --output-names that do not fit the return
    survey = extract(options(tmp_path, dry_run=2, targets=["nactions", "label", "obs.pos"], output_names=["loss", "video"]))
    assert [(t.name, t.row, t.dtype) for t in survey.targets] == [
        ("nactions", (16, 2), "float32"), ("label", (), "int64"), ("obs.pos", None, None)]
    assert survey.problems() == [
        "--targets 'obs.pos': 'obs' is not in the batch (it has ['cond', 'imgs', 'label', 'nactions'])",
        "--output-names gives 2 names (loss video) but the forward returned 3 scalar values (loss, loss_1, loss_2); give "
        "one name for each"]
    text = survey.describe().splitlines()
    assert text[text.index("target         stored row") + 3] == "obs.pos                 -"
    assert text[text.index("these 2 would stop the run:") + 1] == "  --targets 'obs.pos': 'obs' is not in the batch " \
                                                                   "(it has ['cond', 'imgs', 'label', 'nactions'])"
    assert "the forward's return: its scalars cannot be named as given (below)" in text
    assert text[-3:-1] == ["all 2 layers would be stored", "the run's 40 rows: about 320.0 KiB of activations (8.0 KiB "
                           "a row, as the surveyed batches' shapes give it)"]
    # the pace of the batches after the first, which warms up
    assert len(survey.seconds) == 2 and survey.rows_per_second() == pytest.approx(8 / survey.seconds[1])
    assert text[-1].startswith("and about ") and "at the pace of the surveyed batches after the first (" in text[-1]
    assert [_duration(s) for s in (42.04, 600, 5399, 7200)] == ["42.0 s", "10 min", "90 min", "2.0 h"]
    survey = extract(options(tmp_path, dry_run=1))
    assert survey.problems() == [] and "the forward's return: loss, loss_1, loss_2, kept a batch under /outputs " \
        "(--output-names NAME... names them)" in survey.describe().splitlines()
    assert extract(options(tmp_path, dry_run=1, stop_early=True)).outputs is None
    # --out, where given: what the run checks before it starts, and room for what the survey expects
    missing = tmp_path / "no" / "s.h5"
    assert extract(options(tmp_path, dry_run=1, out=str(missing))).problems() == [
        f"--out {missing}: the folder {missing.parent} does not exist; create it or choose another --out"]
    import marstore.extract as ex

    monkeypatch.setattr(ex, "room_left", lambda path, size: (300 << 10, "free on its filesystem"))
    assert extract(options(tmp_path, dry_run=1)).problems() == [
        f"{tmp_path}/s.h5: the run needs about 320.0 KiB for its activations but only 300.0 KiB are free on its "
        "filesystem; make room, write elsewhere (--out), reduce the tokens (--reduction), hook fewer layers or extract "
        "fewer rows (--num-samples)"]
    monkeypatch.setattr(ex, "room_left", lambda path, size: (320 << 10, "free on its filesystem"))
    assert extract(options(tmp_path, dry_run=1)).problems() == []
    # items the data set fails to give: the first stops the dry run as it would the run, or they are counted
    failing = dict(dataset="helpers.failing_data:failing", dataset_args={"size": 40, "fail_at": [3, 9, 30]})
    with pytest.raises(ExtractError, match=r"^the data set failed on item 3: RuntimeError: sample 3 is unreadable; "):
        extract(options(tmp_path, dry_run=2, **failing))
    survey = extract(options(tmp_path, dry_run=2, skip_failed=True, **failing))
    assert (survey.rows, survey.skipped) == (14, [(3, "RuntimeError: sample 3 is unreadable"),
                                                  (9, "RuntimeError: sample 9 is unreadable")])
    assert "2 items failed and would be left out (--skip-failed); the first: item 3: RuntimeError: sample 3 is " \
           "unreadable" in survey.describe().splitlines()
    assert os.listdir(tmp_path) == []  # nothing written


def test_memory_flat_over_many_batches(tmp_path):
    live = []

    def count(rows):
        gc.collect()
        live.append(sum(1 for o in gc.get_objects() if type(o) in (torch.Tensor, nn.Parameter)))

    extract(options(tmp_path, dataset_args={"size": 160}, batch_size=8), on_batch=count)
    # a few batches are in flight in the ring and the writer's queue; none is kept after that
    assert len(live) == 20 and max(live[10:]) <= max(live[:10]), live


def test_bad_layer_fails_before_any_data_is_read(tmp_path):
    with pytest.raises(hooks.HookError, match="matches no module"):
        extract(options(tmp_path, layers=["encoder_blocks.9"]))
    assert not os.path.exists(tmp_path / "s.h5")


def test_resume_refuses_other_options(tmp_path):
    extract(options(tmp_path, num_samples=16))
    with pytest.raises(ExtractError, match=r"--resume: the options differ .*batch_size \(recorded 8, now 4\)"):
        extract(options(tmp_path, num_samples=16, batch_size=4, resume=True))
    before = open(tmp_path / "s.h5", "rb").read()
    with pytest.raises(ExtractError) as info:
        extract(options(tmp_path, num_samples=16, checkpoint=str(tmp_path / "never-read.pt")))
    assert str(info.value) == (f"{tmp_path / 's.h5'} exists: pass --resume to continue it (with the options it was "
                               "written with), or choose another --out")
    assert open(tmp_path / "s.h5", "rb").read() == before


def test_resume_refuses_a_checkpoint_saved_over_since(tmp_path):
    """Training saves over latest.ckpt: a resume that loaded the new weights would append rows of
    another model to the store's."""
    path = tmp_path / "latest.ckpt"
    torch.manual_seed(0)
    save_checkpoint(video_mar(**CONFIG), CONFIG, str(path), "workspace")
    original = path.read_bytes()
    run = dict(checkpoint=str(path), config_key="cfg.policy.model", model_args={}, commit_rows=8)
    with pytest.raises(Interrupted):
        extract(options(tmp_path, **run), on_batch=lambda rows: rows >= 16 and _raise(KeyboardInterrupt))
    store = (tmp_path / "s.h5").read_bytes()
    torch.manual_seed(1)
    save_checkpoint(video_mar(**CONFIG), CONFIG, str(path), "workspace")
    digests = [hashlib.sha256(data).hexdigest()[:12] for data in (original, path.read_bytes())]
    with pytest.raises(ExtractError) as info:
        extract(options(tmp_path, resume=True, **run))
    assert str(info.value) == (f"--resume: the checkpoint {path} is not the one {tmp_path / 's.h5'} was written from (sha256 "
                               f"{digests[0]}... then, {digests[1]}... now: saved over since?); its rows would mix two models' "
                               f"activations: resume with that checkpoint ({path}, {len(original)} bytes), or extract into "
                               "another --out")
    assert (tmp_path / "s.h5").read_bytes() == store
    path.write_bytes(original)  # that checkpoint back: the resume goes on
    assert extract(options(tmp_path, resume=True, **run)).rows == 40


def test_resume_refuses_weights_that_load_otherwise_than_for_the_stores_rows(tmp_path):
    """A store begun by a marstore that loaded the checkpoint otherwise (one that did not strip a
    prefix this one strips) would get rows of other weights after the resume."""
    import h5py

    path = tmp_path / "lit.ckpt"
    save_checkpoint(video_mar(**CONFIG), CONFIG, str(path), "lightning")
    run = dict(checkpoint=str(path), model_args={}, commit_rows=8)
    with pytest.raises(Interrupted):
        extract(options(tmp_path, **run), on_batch=lambda rows: rows >= 16 and _raise(KeyboardInterrupt))
    with h5py.File(tmp_path / "s.h5", "r+") as f:
        recorded = json.loads(f.attrs["run"])
        assert recorded["load_report"]["stripped_prefix"] == "model."
        recorded["load_report"]["stripped_prefix"] = None
        f.attrs["run"] = json.dumps(recorded, sort_keys=True)
    store = (tmp_path / "s.h5").read_bytes()
    with pytest.raises(ExtractError) as info:
        extract(options(tmp_path, resume=True, **run))
    assert str(info.value) == (f"--resume: the checkpoint loads into the model otherwise than when {tmp_path / 's.h5'} was "
                               "begun (stripped prefix None then, 'model.' now); its rows would mix two models' activations: "
                               "extract into another --out")
    assert (tmp_path / "s.h5").read_bytes() == store


def test_resume_continues_a_store_written_before_newer_options_existed(tmp_path, caplog, capsys):
    import json

    import h5py

    def stop(rows):
        if rows >= 16:
            raise KeyboardInterrupt

    # with UVA's action head unfolded (B*4 rows): an earlier marstore did not record its k
    unfolded = dict(layers=["encoder_blocks.*", "diffactloss.conv"], unfold_batch=True)
    with pytest.raises(Interrupted):
        extract(options(tmp_path, commit_rows=8, **unfolded), on_batch=stop)
    with h5py.File(tmp_path / "s.h5", "r+", locking=False) as f:  # as an earlier marstore wrote it
        del f["activations/diffactloss.conv"].attrs["unfolded"]
        run = json.loads(f.attrs["run"])
        for key in ("output_names", "autocast"):  # options it did not have (it had --unfold-batch)
            del run["options"][key]
        del run["seeding"]  # it seeded torch once, at the start
        f.attrs["run"] = json.dumps(run)
        f.attrs["layers"] = json.dumps([{k: v for k, v in spec.items() if k != "unfolded"}  # a later layer field
                                        for spec in json.loads(f.attrs["layers"])])
    capsys.readouterr()
    assert main(["info", str(tmp_path / "s.h5")]) == 0
    assert "  seed: 0, torch seeded once at the start (an earlier marstore)" in capsys.readouterr().out.splitlines()
    with caplog.at_level(logging.WARNING, logger="marstore.extract"):
        result = extract(options(tmp_path, commit_rows=8, resume=True, **unfolded))
    assert (f"--resume: {tmp_path / 's.h5'} was written by an earlier marstore, which seeded torch once at the start: a "
            "model or data set that draws at random (MAR's masks) draws the rows after its 16 otherwise than that run "
            "would have") in caplog.messages
    extract(options(tmp_path, commit_rows=8, out=str(tmp_path / "ref.h5"), **unfolded))
    assert result.rows == 40
    assert_same_store(str(tmp_path / "s.h5"), str(tmp_path / "ref.h5"))
    with pytest.raises(ExtractError, match=r"output_names \(recorded \[\], now \['a', 'b', 'c'\]\)"):
        extract(options(tmp_path, out=str(tmp_path / "ref.h5"), output_names=["a", "b", "c"], resume=True, **unfolded))


def assert_same_store(a: str, b: str) -> None:
    with open_store(a) as x, open_store(b) as y:
        assert (x.rows, sorted(x.layers), sorted(x.targets)) == (y.rows, sorted(y.layers), sorted(y.targets))
        for name in x.layers:
            assert x.read(name).tobytes() == y.read(name).tobytes(), name
        for name in x.targets:
            assert x.target(name).tobytes() == y.target(name).tobytes(), name
        assert x.index().tolist() == y.index().tolist()


@pytest.mark.parametrize("factory", ["synthetic_stream", "plain_iterable"])
def test_an_iterable_data_set_gives_its_first_n_items(tmp_path, factory):
    mapped = extract(options(tmp_path, out=str(tmp_path / "map.h5"), num_samples=20))
    streamed = extract(options(tmp_path, dataset=f"helpers.streams:{factory}", num_samples=20))
    assert streamed.rows == 20
    assert_same_store(mapped.path, streamed.path)
    with open_store(streamed.path) as s:
        assert s.index().tolist() == list(range(20)) and s.metadata["options"]["num_samples"] == 20


@pytest.mark.parametrize("kw, message", [
    ({"dataset": "helpers.streams:not_a_dataset", "dataset_args": {}},
     r"--dataset helpers.streams:not_a_dataset returned a int: neither a map-style data set \(__len__ and "
     r"__getitem__\) nor an iterable one \(__iter__\)$"),
    ({"dataset": "helpers.streams:synthetic_stream"},
     r"returned a SyntheticStream, an iterable data set with no length: pass --num-samples N to take its first N items$"),
    ({"dataset": "helpers.streams:synthetic_stream", "num_samples": 8, "sample_seed": 1},
     r"--sample-seed draws from a known length, so it needs a map-style data set"),
    ({"dataset": "helpers.streams:plain_iterable", "num_samples": 8, "workers": 2},
     r"returned a PlainIterable, an iterable data set: it is read in order in this process, so --workers must be 0"),
    ({"dataset_args": {"size": 40, "bogus": 1}},
     r"^--dataset marstore.models:synthetic_video_actions rejects the arguments \{'size': 40, 'bogus': 1\} "
     r"\(SyntheticVideoActions.__init__\(\) got an unexpected keyword argument 'bogus'\); it takes "
     r"synthetic_video_actions\(size: 'int' = 512, seed: 'int' = 0, \*\*kwargs\)"),
])
def test_a_data_set_that_cannot_be_extracted_as_asked_is_refused_before_any_item_is_read(tmp_path, kw, message):
    with pytest.raises(ExtractError, match=message):
        extract(options(tmp_path, **kw))
    assert not os.path.exists(tmp_path / "s.h5")


def test_a_single_name_given_as_a_string_is_one_name(tmp_path):
    opts = options(tmp_path, layers="encoder_blocks.*", targets="label")
    assert (opts.layers, opts.targets) == (["encoder_blocks.*"], ["label"])  # not ['e', 'n', ...]


@pytest.mark.parametrize("kw, message", [
    ({"batch_size": 0}, "--batch-size 0: give an integer of at least 1"),
    ({"workers": -1}, "--workers -1: give an integer of at least 0"),
    ({"num_samples": 0}, "--num-samples 0: give an integer of at least 1"),
    ({"commit_rows": 2.5}, "--commit-rows 2.5: give an integer"),
    ({"targets": ["label", "nactions", "label"]}, "--targets names label more than once; give each once"),
    ({"sample_seed": 3}, "--sample-seed 3 draws --num-samples items at random; give --num-samples N"),
])
def test_counts_that_cannot_be_are_refused_in_one_line(tmp_path, kw, message):
    with pytest.raises(ExtractError) as info:
        options(tmp_path, **kw)
    assert str(info.value) == message


def test_a_device_or_folder_that_is_not_there_is_refused_before_the_checkpoint_is_read(tmp_path):
    never_read = str(tmp_path / "never-read.pt")
    (tmp_path / "runs").mkdir()
    cases = [({"device": "gpu"}, "--device 'gpu': give cpu, cuda or cuda:N"),
             ({"device": "mps"}, "--device mps: marstore runs on cpu or cuda (cuda:N), not mps"),
             ({"device": "cpu:3"}, "--device cpu:3: the CPU takes no index; use --device cpu"),
             ({"out": str(tmp_path / "runs")},
              f"--out {tmp_path / 'runs'} is a folder; give the store's file name, e.g. {tmp_path / 'runs' / 'activations.h5'}"),
             ({"out": str(tmp_path / "no" / "s.h5")},
              f"--out {tmp_path / 'no' / 's.h5'}: the folder {tmp_path / 'no'} does not exist; create it or choose another --out")]
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        cases.append(({"device": f"cuda:{count}"}, f"--device cuda:{count}: this machine has {count} GPU(s), cuda:0 to "
                                                   f"cuda:{count - 1}"))
    else:
        cases.append(({"device": "cuda"}, f"--device cuda: no GPU is usable here (torch {torch.__version__}); use --device cpu"))
    for kw, message in cases:
        with pytest.raises(ExtractError) as info:
            extract(options(tmp_path, checkpoint=never_read, **kw))
        assert str(info.value) == message
    assert os.listdir(tmp_path) == ["runs"] and os.listdir(tmp_path / "runs") == []


def test_keys_the_forward_does_not_take_are_left_out_with_a_warning(tmp_path, caplog):
    """The built-in data set's items hold a label that VideoActionMAR.forward does not take: the
    default forward leaves it out, as Hugging Face's Trainer leaves out such columns, and says so
    once; the model gets what policy_forward gives it."""
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="marstore.extract"):
        result = extract(options(tmp_path, forward=None, out=str(tmp_path / "default.h5")))
    said = [r.getMessage() for r in caplog.records if "leaves out" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(
        "the default forward leaves out the batch's keys ['label'], which VideoActionMAR.forward(imgs, cond, "
        "history_nactions=None, nactions=None,")
    assert said[0].endswith("does not take (--targets stores them; --forward MODULE:CALLABLE passes the batch otherwise)")
    torch.manual_seed(0)
    policy = extract(options(tmp_path, out=str(tmp_path / "policy.h5")))
    with open_store(result.path) as a, open_store(policy.path) as b:
        assert a.read("encoder_blocks.1").tobytes() == b.read("encoder_blocks.1").tobytes()
        assert a.target("label").tolist() == b.target("label").tolist()  # stored all the same


def test_a_batch_the_model_does_not_take_asks_for_a_forward(tmp_path, monkeypatch):
    """Keys of which the forward takes none, or that leave out an argument it needs, are the
    user's to fix: an error that names the forward's signature."""
    from marstore.models import data

    original = data.SyntheticVideoActions.__getitem__
    monkeypatch.setattr(data.SyntheticVideoActions, "__getitem__",
                        lambda self, i: {k: v for k, v in original(self, i).items() if k != "cond"})
    with pytest.raises(ExtractError, match=r"^the default forward calls the model with the batch's keys \['imgs', "
                                           r"'nactions'\], and VideoActionMAR.forward\(imgs, cond, .*\) rejects "
                                           r"them \(VideoActionMAR.forward\(\) missing 1 required positional argument: "
                                           r"'cond'\); give --forward MODULE:CALLABLE"):
        extract(options(tmp_path, forward=None))
    assert os.listdir(tmp_path) == []  # the store is made after the first batch


def test_a_type_error_inside_the_forward_keeps_its_traceback(tmp_path):
    class Broken(nn.Module):
        def forward(self, x):
            return x + "a"

    class Pair(nn.Module):
        def forward(self, x, y):
            return x + y

    from marstore.extract import default_forward
    with pytest.raises(TypeError, match="unsupported operand"):
        default_forward(Broken(), torch.zeros(2))
    with pytest.raises(TypeError, match="unsupported operand"):  # (x, label): the label left out, x reaches the forward
        default_forward(Broken(), (torch.zeros(2), torch.zeros(2)))
    with pytest.raises(ExtractError, match=r"with the batch's 1 positional value, and Pair.forward\(x, y\) rejects them"):
        default_forward(Pair(), (torch.zeros(2),))


def test_a_dict_batch_goes_whole_to_a_forward_of_one_batch_argument(caplog):
    """forward(self, batch) of a dict batch none of whose keys it names: the batch goes whole,
    said once; a forward whose one argument is not named as batches are (nn.Sequential's input)
    still asks for --forward."""

    class Policy(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(3, 2)

        def forward(self, batch, scale: float = 1.0):
            return self.enc(batch["obs"]).sum() * scale + batch["y"].sum()

    from marstore.extract import DefaultForward
    torch.manual_seed(0)
    policy, forward = Policy(), DefaultForward()
    batch = {"obs": torch.randn(4, 3), "y": torch.ones(4)}
    with caplog.at_level(logging.INFO, logger="marstore.extract"):
        assert torch.equal(forward(policy, batch), policy(batch)) and torch.equal(forward(policy, batch), policy(batch))
    assert caplog.text.count("the default forward passes the batch whole to Policy.forward(batch, scale: float = 1.0), "
                             "as batch: none of its keys (obs, y) names an argument of it") == 1
    with pytest.raises(ExtractError, match=r"^the default forward calls the model with the batch's keys \['obs', 'y'\], "
                                           r"and Sequential.forward\(input\) rejects them"):
        forward(nn.Sequential(nn.Linear(3, 2)), batch)


def test_the_labels_of_image_label_items_are_left_out_of_the_forward_and_stored_as_targets(tmp_path, caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(20, 8), torch.arange(20) % 3
    result = extract_from(model, torch.utils.data.TensorDataset(x, y), str(tmp_path / "s.h5"), ["0"], targets=["1"],
                          batch_size=8, progress=False)
    assert caplog.text.count("the default forward passes the first 1 of the batch's 2 values, as many as "
                             "Sequential.forward(input) takes, and leaves out values 1 (--targets 1 stores them; "
                             "--forward MODULE:CALLABLE passes the batch otherwise)") == 1
    with torch.inference_mode(), open_store(result.path) as s:
        assert s.target("1").tolist() == y.tolist()
        assert s.read("0").tobytes() == torch.cat([model[0](x[i:i + 8]) for i in range(0, 20, 8)]).half().numpy().tobytes()


def cuda_on_third_batch(model, batch):
    cuda_on_third_batch.calls += 1
    if cuda_on_third_batch.calls == 3:
        batch["imgs"] = batch["imgs"].cuda()  # as MAR's forward calls .cuda() itself
    return policy_forward(model, batch)


def cuda_every_way(model, batch):
    """Each way a model's code puts tensors on CUDA (MAR's .cuda(), UVA-like .to(device) with
    device "cuda", factories given device=), each leaving the values as they were."""
    model.cuda()
    model.to("cuda:0")
    zero = (torch.zeros(1, device="cuda") + torch.ones(1, device=torch.device("cuda", 0)) - torch.tensor([1.0], device=0)
            + torch.arange(1, device="cuda").float() + batch["imgs"].new_zeros(1, device="cuda"))
    batch = {"imgs": batch["imgs"].to("cuda") + zero.cuda(0), "cond": batch["cond"].cuda(non_blocking=True),
             "nactions": batch["nactions"].to(device="cuda").to(torch.device("cuda"), torch.float32, non_blocking=True)}
    return policy_forward(model, batch)


class Projection(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(x)


def test_float64_data_for_float32_weights_stops_in_one_line_naming_the_batchs_tensors(tmp_path):
    items = [{"x": np.random.default_rng(i).standard_normal(8), "label": i} for i in range(8)]  # numpy's float64
    here = f"{__file__}:{inspect.getsourcelines(Projection.forward)[1] + 1}"
    with pytest.raises(ExtractError) as info:
        extract_from(Projection(), items, str(tmp_path / "s.h5"), ["fc"], batch_size=4, progress=False)
    assert str(info.value) == (
        f"the forward failed on the batch's dtype (at {here} in forward: `return self.fc(x)`; RuntimeError: mat1 and "
        "mat2 must have the same dtype, but got Double and Float): the batch's x is float64, the model's weights "
        "float32; give the data set items of the weights' dtype (numpy and Python floats are float64: "
        ".astype(np.float32)), or a --forward that casts them")
    assert not os.path.exists(tmp_path / "s.h5")  # the store is made after the first batch
    with pytest.raises(ExtractError, match=r"\): the batch is float32, the model's weights bfloat16; give "):
        extract_from(Projection().to(torch.bfloat16), torch.randn(8, 8), str(tmp_path / "b.h5"), ["fc"], batch_size=4,
                     progress=False)
    # a model of float64 weights takes them; a dtype error of the model's own stays the model's, with its traceback
    result = extract_from(Projection().double(), items, str(tmp_path / "d.h5"), ["fc"], batch_size=4, progress=False)
    assert result.rows == 8
    with pytest.raises(RuntimeError, match=r"^mat1 and mat2 must have the same dtype"):
        extract_from(Projection(), [torch.randn(8) for _ in range(8)], str(tmp_path / "m.h5"), ["fc"], batch_size=4,
                     progress=False, forward=lambda model, x: model.fc(x.double()))

def test_a_forward_that_uses_cuda_itself_on_a_cpu_run_stops_in_one_line(tmp_path, caplog):
    """MAR's forward calls .cuda(): on a run whose device is the CPU it fails inside torch; the
    error says so in one line, with the model's line that did it, and the rows before it stay.
    --redirect-cuda keeps those calls' tensors on the CPU: the run stores what a forward without
    them would."""
    fix = "; this machine has none" if not torch.cuda.is_available() else ""
    for dry_run in (3, False):
        cuda_on_third_batch.calls = 0
        if dry_run:  # a finding of the dry run's, in the batch where it stops the run
            survey = extract(options(tmp_path, forward="test_extract:cuda_on_third_batch", dry_run=dry_run))
            assert survey.batches == 2 and len(survey.problems()) == 1 and survey.problems()[0].startswith("in batch 3: ")
            message = survey.problems()[0].removeprefix("in batch 3: ")
        else:
            with pytest.raises(ExtractError) as info, caplog.at_level(logging.ERROR, logger="marstore.extract"):
                extract(options(tmp_path, forward="test_extract:cuda_on_third_batch", dry_run=dry_run))
            message = str(info.value)
        assert message.startswith("the forward uses CUDA in its own code (at ")
        if not torch.cuda.is_available():  # else torch fails later, in the model, on weights left on the CPU
            assert message == (f"the forward uses CUDA in its own code (at {__file__}:{cuda_on_third_batch.__code__.co_firstlineno + 3} "
                               "in cuda_on_third_batch: `batch[\"imgs\"] = batch[\"imgs\"].cuda()  # as MAR's forward calls "
                               ".cuda() itself`; AssertionError: Torch not compiled with CUDA enabled) and this run's device is "
                               "cpu: run it on a GPU (--device cuda; this machine has none), or pass --redirect-cuda to keep "
                               "the tensors it puts on CUDA (MAR's .cuda() calls) on cpu")
        assert message.endswith(f"run it on a GPU (--device cuda{fix}), or pass --redirect-cuda to keep the tensors it puts "
                                "on CUDA (MAR's .cuda() calls) on cpu")
    assert "stopped by ExtractError: " + str(tmp_path / "s.h5") + " keeps its 16 committed rows" in caplog.text
    with open_store(tmp_path / "s.h5") as store:
        assert (store.rows, store.status) == (16, "incomplete")
    # the forward's other errors keep their traceback, with a note of what failed where
    failing_forward.calls = 0
    with pytest.raises(RuntimeError) as info:
        extract(options(tmp_path, forward="test_extract:failing_forward", out=str(tmp_path / "t.h5")))
    assert str(info.value) == "the third batch fails"
    assert info.value.__notes__ == [
        "marstore: the forward failed on the batch of items 16 to 23 (imgs Tensor(8, 4, 4, 4, 4) float32, cond Tensor(8, 4, "
        "4, 4, 4) float32, nactions Tensor(8, 16, 2) float32, label Tensor(8,) int64): at "
        f"{__file__}:{failing_forward.__code__.co_firstlineno + 2} in failing_forward: `raise RuntimeError(\"the third batch "
        "fails\")`; RuntimeError: the third batch fails"]
    # --redirect-cuda: the same rows as a forward that makes no .cuda() call, said once, at the first call
    def redirected(forward, out):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="marstore.extract"):
            result = extract(options(tmp_path, forward=f"test_extract:{forward}", redirect_cuda=True, out=str(tmp_path / out)))
        return result, [r.getMessage() for r in caplog.records if "--redirect-cuda" in r.getMessage()]

    cuda_on_third_batch.calls = 0
    third, said = redirected("cuda_on_third_batch", "redirected.h5")
    assert said == ["--redirect-cuda: forward 3 called Tensor.cuda(); its tensors, and those of every later call to CUDA, "
                    "stay on cpu"]
    # every other way of putting tensors on CUDA, from the first forward on (the model's .cuda() first)
    every_way, said = redirected("cuda_every_way", "every_way.h5")
    assert said == ["--redirect-cuda: forward 1 called Tensor.cuda(); its tensors, and those of every later call to CUDA, "
                    "stay on cpu"]
    # the reference: a plain run, with nn.MultiheadAttention's fused fast path off, as torch turns it off under the
    # flag's torch function mode (the fused kernel rounds otherwise)
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        plain = extract(options(tmp_path, out=str(tmp_path / "plain.h5")))
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    with open_store(third.path) as a, open_store(plain.path) as b, open_store(every_way.path) as c:
        assert a.rows == b.rows == c.rows == 40
        assert all(a.read(n).tobytes() == b.read(n).tobytes() == c.read(n).tobytes() for n in b.layers)
    if not torch.cuda.is_available():  # torch itself is left as it was, outside the forward
        with pytest.raises((AssertionError, RuntimeError), match="Torch not compiled with CUDA enabled"):
            torch.zeros(1).cuda()
        # a use of CUDA that is not a tensor put there: the one-line error says the flag does not cover it
        with pytest.raises(ExtractError) as info:
            extract(options(tmp_path, forward="test_extract:synchronizes_cuda", redirect_cuda=True,
                            out=str(tmp_path / "synchronized.h5")))
        assert str(info.value) == (
            f"the forward uses CUDA in its own code (at {__file__}:{synchronizes_cuda.__code__.co_firstlineno + 1} in "
            "synchronizes_cuda: `torch.cuda.synchronize()`; AssertionError: Torch not compiled with CUDA enabled) and this "
            "run's device is cpu: --redirect-cuda moves only the tensors that torch calls put on CUDA, not this: run it on "
            "a GPU (--device cuda; this machine has none)")
    # recorded as --device is not: a resume may add or drop it
    assert "redirect_cuda" not in ExtractOptions(out="o", model="m", dataset="d", layers=["x"], redirect_cuda=True).recorded()


def synchronizes_cuda(model, batch):
    torch.cuda.synchronize()
    return policy_forward(model, batch)


def failing_forward(model, batch):
    if failing_forward.calls == 2:
        raise RuntimeError("the third batch fails")
    failing_forward.calls += 1
    return policy_forward(model, batch)


def test_a_failed_run_ends_its_data_workers_at_once(tmp_path):
    # A traceback that pytest (or a notebook) keeps holds the loader's iterator; its workers, which
    # ignore SIGTERM while a run goes on, used to live until the interpreter's exit, whose SIGTERM
    # they ignored: the process never ended.
    import multiprocessing

    failing_forward.calls = 0
    with pytest.raises(RuntimeError, match="the third batch fails") as info:
        extract(options(tmp_path, forward="test_extract:failing_forward", workers=2))
    assert info.value.__traceback__ is not None  # kept, with every frame's locals
    assert [p for p in multiprocessing.active_children() if p.is_alive()] == []


def test_a_data_worker_ignores_sigterm_until_the_run_is_over():
    import multiprocessing

    finished, ready = multiprocessing.Event(), multiprocessing.Event()
    worker = multiprocessing.Process(target=_sleeping_worker, args=(finished, ready), daemon=True)
    worker.start()
    assert ready.wait(30)
    os.kill(worker.pid, signal.SIGTERM)  # the scheduler's, to the whole job: the run still needs the worker
    worker.join(1.0)
    assert worker.is_alive()
    finished.set()
    os.kill(worker.pid, signal.SIGTERM)  # the loader's shutdown, the interpreter's exit, or the job's handled late
    worker.join(30)
    # status 0: a worker killed by the signal made the loader's SIGCHLD check raise in the main
    # process while it shut the workers down, and a stopped run exited 1 instead of 143
    assert worker.exitcode == 0


def _sleeping_worker(finished, ready):
    from marstore.extract import _quiet_worker

    _quiet_worker(finished, 0)
    ready.set()
    while True:
        time.sleep(0.05)

def test_a_run_without_a_checkpoint_says_whose_weights_it_used(tmp_path, caplog):
    result = extract(options(tmp_path, num_samples=8))
    assert ("no --checkpoint: the model keeps the weights marstore.models:video_mar gave it (random, unless it loads "
            "its own)") in [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert result.load_report.get("checkpoint") is None


def test_a_text_target_is_stored_as_utf8_strings_also_across_a_resume(tmp_path, capsys):
    calls = []

    def stop_after_three(rows):
        calls.append(rows)
        if len(calls) == 3:
            raise KeyboardInterrupt

    opts = options(tmp_path, dataset="helpers.streams:named_samples", targets=["label", "task"], commit_rows=16)
    with pytest.raises(Interrupted) as info:
        extract(opts, on_batch=stop_after_three)
    assert info.value.rows == 24  # the resume starts inside the chunk of strings it left
    result = extract(dataclasses.replace(opts, resume=True))
    tasks = [["push", "pick", "place é"][i % 3] for i in range(40)]
    with open_store(result.path) as s:
        assert s.rows == 40 and s.target("task").tolist() == tasks and s.target("task", 3, 5).tolist() == tasks[3:5]
        assert [t["dtype"] for t in json.loads(s.file.attrs["targets"])] == ["int64", "str"]
    with h5py.File(result.path, "r") as f:  # what any HDF5 reader sees: variable-length UTF-8 strings
        assert h5py.check_string_dtype(f["targets/task"].dtype).encoding == "utf-8"
        assert f["targets/task"][5] == "place é".encode()

    assert main(["info", "--json", result.path]) == 0
    assert json.loads(capsys.readouterr().out)["targets"]["task"] == {
        "shape": [40], "dtype": "str", "summary": {"counts": {"push": 14, "pick": 13, "place é": 13}}}


def test_an_item_the_data_set_fails_to_give_stops_the_run_in_one_line_and_keeps_the_rows_before(tmp_path, caplog):
    opts = options(tmp_path, dataset="helpers.failing_data:failing", dataset_args={"size": 40, "fail_at": 29},
                   commit_rows=8)
    with pytest.raises(ExtractError) as info:
        extract(opts)
    assert str(info.value) == ("the data set failed on item 29: RuntimeError: sample 29 is unreadable; fix it (its traceback "
                               "is logged above), or pass --skip-failed to leave out the items that fail (each is "
                               "recorded in the store)")
    traceback_logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("the data set's traceback")]
    assert traceback_logged[0].startswith("the data set's traceback for item 29:\nTraceback (most recent call last):")
    assert traceback_logged[0].endswith("RuntimeError: sample 29 is unreadable")
    with open_store(opts.out) as s:
        assert s.rows == 24 and s.status == "incomplete" and s.skipped() == []  # the batches before item 29's
    early = options(tmp_path, out=str(tmp_path / "early.h5"), dataset="helpers.failing_data:failing",
                    dataset_args={"size": 40, "fail_at": 13})
    with pytest.raises(ExtractError, match="^the data set failed on item 13: RuntimeError: sample 13 is unreadable;"):
        extract(early)
    with open_store(early.out) as s:  # the first batch was still waiting for a second to create the store
        assert s.rows == 8 and s.status == "incomplete" and s.index().tolist() == list(range(8))
    assert extract(dataclasses.replace(early, resume=True, skip_failed=True)).skipped == [
        (13, "RuntimeError: sample 13 is unreadable")]


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_failed_leaves_out_the_items_that_fail_records_them_and_resumes_past_them(tmp_path, workers):
    # 9-15 fill a whole batch of 8 (one item of it, 8, is read); 37 and 39 are in the last batch
    fail_at = [3, *range(9, 16), 37, 39]
    base = dict(dataset="helpers.failing_data:failing", dataset_args={"size": 40, "fail_at": fail_at}, commit_rows=8,
                workers=workers)
    whole = extract(options(tmp_path, out=str(tmp_path / "whole.h5"), skip_failed=True, **base))
    kept = [i for i in range(40) if i not in fail_at]
    errors = [(i, f"RuntimeError: sample {i} is unreadable") for i in fail_at]
    assert whole.rows == len(kept) and whole.skipped == errors
    with open_store(whole.path) as s:
        assert s.status == "complete" and s.index().tolist() == kept and s.skipped() == errors

    calls = []

    def stop_after_three(rows):
        calls.append(rows)
        if len(calls) == 3:
            raise KeyboardInterrupt

    opts = options(tmp_path, out=str(tmp_path / "resumed.h5"), skip_failed=True, **base)
    with pytest.raises(Interrupted):
        extract(opts, on_batch=stop_after_three)
    with open_store(opts.out) as s:
        assert s.rows == 16 and s.skipped() == errors[:8]  # batches 0-7, 8-15 (one row) and 16-23
    resumed = extract(dataclasses.replace(opts, resume=True))
    assert resumed.skipped == errors
    with open_store(opts.out) as a, open_store(whole.path) as b:
        assert a.index().tolist() == kept and all(np.array_equal(a.read(n), b.read(n)) for n in a.layers)


def test_skip_failed_stops_a_data_set_that_gives_nothing(tmp_path):
    with pytest.raises(ExtractError) as info:
        extract(options(tmp_path, dataset="helpers.failing_data:failing", skip_failed=True,
                        dataset_args={"size": 200, "fail_at": list(range(200))}))
    assert str(info.value) == ("the data set failed on each of the 64 items asked of it so far (the first: item 0, "
                               "RuntimeError: sample 0 is unreadable): it is broken, not some of its files; fix it before "
                               "--skip-failed can help")
    with pytest.raises(ExtractError) as info:
        extract(options(tmp_path, dataset="helpers.failing_data:failing", skip_failed=True,
                        dataset_args={"size": 20, "fail_at": list(range(20))}))
    assert str(info.value) == ("the data set yielded no rows to extract (all 20 items failed: RuntimeError: sample 0 is "
                               "unreadable ...)")
    assert os.listdir(tmp_path) == []


def test_an_iterable_data_set_that_fails_stops_in_one_line(tmp_path):
    with pytest.raises(ExtractError) as info:
        extract(options(tmp_path, dataset="helpers.failing_data:failing_stream", dataset_args={"size": 40, "fail_at": 13},
                        num_samples=40, skip_failed=True))
    assert str(info.value) == ("the iterable data set failed on item 13: RuntimeError: sample 13 is unreadable; fix it (its "
                               "traceback is logged above): an iterator cannot go on past an error, so --skip-failed does "
                               "not apply")


def test_a_target_that_is_neither_numbers_nor_text_is_refused_before_the_store_is_made(tmp_path):
    with pytest.raises(ExtractError) as info:
        extract(options(tmp_path, dataset="helpers.streams:named_samples", targets=["label", "raw"]))
    assert str(info.value) == ("--targets 'raw' holds bytes (decode them to str in the data set); targets are numbers "
                               "(booleans, integers, floats) or text")
    assert os.listdir(tmp_path) == []
    # a mapping of several entries (a robot's obs: {state, agent_pos}): one of them is the target
    model = nn.Sequential(nn.Linear(3, 2))
    items = [{"x": torch.randn(3), "obs": {"state": torch.randn(3), "agent_pos": torch.randn(2)}} for _ in range(8)]
    with pytest.raises(ExtractError) as info:
        extract_from(model, items, str(tmp_path / "s.h5"), ["0"], targets=["o=obs"], forward=linear_of_x, progress=False)
    assert str(info.value) == "--targets 'o' is a mapping of state, agent_pos: name one of its entries, as obs.state"
    assert os.listdir(tmp_path) == []
    result = extract_from(model, items, str(tmp_path / "s.h5"), ["0"], targets=["obs.agent_pos"], forward=linear_of_x,
                          progress=False)
    with open_store(result.path) as store:
        assert np.array_equal(store.target("obs.agent_pos"), torch.stack([i["obs"]["agent_pos"] for i in items]).numpy())


def linear_of_x(model, batch):
    return model(batch["x"])


def test_namedtuple_batches_reach_the_forward_and_name_targets(tmp_path):
    extract(options(tmp_path, out=str(tmp_path / "dicts.h5"), num_samples=16))
    extract(options(tmp_path, out=str(tmp_path / "tuples.h5"), dataset="helpers.streams:tuple_samples",
                    forward="helpers.streams:tuple_forward", num_samples=16))
    with open_store(tmp_path / "dicts.h5") as a, open_store(tmp_path / "tuples.h5") as b:
        assert b.rows == 16 and list(b.layers) == list(a.layers)
        assert all(np.array_equal(a.read(n), b.read(n)) for n in a.layers)
        assert all(np.array_equal(a.target(n), b.target(n)) for n in ("nactions", "label"))
    with pytest.raises(ExtractError) as info:
        extract(options(tmp_path, dataset="helpers.streams:tuple_samples", forward="helpers.streams:tuple_forward",
                        targets=["actions"]))
    assert str(info.value) == "--targets 'actions': 'actions' is not in the batch (it has ['imgs', 'cond', 'nactions', 'label'])"


@pytest.mark.parametrize("workers", [0, 2])
def test_dataclass_items_are_batched_field_by_field(tmp_path, workers):
    # torch's collate refuses dataclasses; the forward gets a batch of the item's own class
    extract(options(tmp_path, out=str(tmp_path / "dicts.h5"), num_samples=16))
    extract(options(tmp_path, out=str(tmp_path / "records.h5"), dataset="helpers.streams:dataclass_samples",
                    forward="helpers.streams:dataclass_forward", num_samples=16, workers=workers,
                    targets=["label", "frames"]))
    with open_store(tmp_path / "dicts.h5") as a, open_store(tmp_path / "records.h5") as b:
        assert b.rows == 16 and list(b.layers) == list(a.layers)
        assert all(np.array_equal(a.read(n), b.read(n)) for n in a.layers)
        assert np.array_equal(a.target("label"), b.target("label"))
        assert b.target("frames").tolist() == [4] * 16
    with pytest.raises(ExtractError) as info:
        extract(options(tmp_path, dataset="helpers.streams:dataclass_samples", forward="helpers.streams:dataclass_forward",
                        targets=["actions"]))
    assert str(info.value) == ("--targets 'actions': 'actions' is not in the batch (it has ['imgs', 'cond', 'nactions', "
                               "'label', 'frames'])")
    from marstore.extract import _to_device
    from helpers.streams import dataclass_samples

    item = dataclass_samples(2)[1]
    moved = _to_device(item, torch.device("meta"))  # fields moved, nothing computed again
    assert type(moved) is type(item) and moved.imgs.is_meta and moved.frames == 4 and not item.imgs.is_meta


@pytest.mark.parametrize("workers", [0, 2])
def test_items_that_cannot_be_batched_name_the_field_in_one_line(tmp_path, workers):
    # a field that is None in every item (UVA's text_latents) stays None for the batch
    result = extract(options(tmp_path, dataset="helpers.streams:with_extra", num_samples=16, workers=workers))
    assert result.rows == 16
    for extra, why in (("uneven", "stack expects each tensor to be equal size, but got [1] at entry 0 and [2] at entry 1"),
                       ("some_none", "it is None in some items and not in others")):
        out = tmp_path / f"{extra}.h5"
        with pytest.raises(ExtractError) as info:  # from a worker too: one line, not a worker's traceback
            extract(options(tmp_path, out=str(out), dataset="helpers.streams:with_extra", dataset_args={"extra": extra},
                            workers=workers))
        assert str(info.value) == (f"a batch of 8 items (the first is item 0) cannot be made: their field 'text_latents': "
                                   f"{why}; give every item the same fields and shapes (a field that is None in all of "
                                   "them stays None), give --collate MODULE:CALLABLE that batches them (pads them), or "
                                   "use --batch-size 1")
        assert not out.exists()


class Sentences(torch.utils.data.Dataset):
    """Token ids of 2 + i % 5 tokens: items of different lengths, as text and action chunks are."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> dict:
        return {"ids": torch.arange(2 + i % 5) + i, "label": i % 2}


def pad_ids(items: list[dict]) -> dict:
    """A --collate: the ids padded with 0 to the batch's longest, and their mask."""
    ids = torch.nn.utils.rnn.pad_sequence([item["ids"] for item in items], batch_first=True)
    lengths = torch.tensor([len(item["ids"]) for item in items])
    return {"ids": ids, "mask": torch.arange(ids.shape[1]) < lengths[:, None],
            "label": torch.tensor([item["label"] for item in items])}


class Embedder(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, 4)

    def forward(self, ids, mask):
        return self.embed(ids) * mask[..., None]


def broken_collate(items: list[dict]) -> dict:
    raise ValueError(f"cannot pad {len(items)} items")


@pytest.mark.parametrize("workers", [0, 2])
def test_a_collate_batches_items_of_different_lengths(tmp_path, workers, caplog, capsys):
    kw = dict(model="test_extract:Embedder", dataset="test_extract:Sentences", layers=["embed"], targets=["label"],
              batch_size=4, progress=False, device="cpu", workers=workers)
    with pytest.raises(ExtractError, match=r"cannot be made: their field 'ids': stack expects each tensor to be equal "
                                           r"size, .*give --collate MODULE:CALLABLE that batches them \(pads them\), or "):
        extract(ExtractOptions(out=str(tmp_path / "plain.h5"), **kw))
    result = extract(ExtractOptions(out=str(tmp_path / "s.h5"), collate="test_extract:pad_ids", **kw))
    data = Sentences()
    with open_store(result.path) as s, torch.inference_mode():
        assert s.layers["embed"].layout == "ragged" and s.metadata["collate"] == "test_extract:pad_ids"
        assert s.metadata["options"]["collate"] == "test_extract:pad_ids"
        batches = [pad_ids([data[i] for i in range(start, start + 4)]) for start in range(0, 12, 4)]
        expected = [row for batch in batches for row in Embedder().embed(batch["ids"]).half().numpy()]
        assert [r.shape[0] for r in expected] == [5] * 4 + [6] * 8  # each batch padded to its longest
        assert [r.tobytes() for r in s.read("embed")] == [r.tobytes() for r in expected]
        assert s.target("label").tolist() == [i % 2 for i in range(12)]
    # resumed with another collate: refused, as any option that changes the rows
    with pytest.raises(ExtractError, match=r"the options differ from the ones .* was written with: collate \(recorded "
                                           r"'test_extract:pad_ids', now 'test_extract:broken_collate'\)$"):
        extract(ExtractOptions(out=str(tmp_path / "s.h5"), collate="test_extract:broken_collate", resume=True, **kw))
    with pytest.raises(ExtractError) as info:  # its own error: one line, its traceback logged (from a worker too)
        extract(ExtractOptions(out=str(tmp_path / "b.h5"), collate="test_extract:broken_collate", **kw))
    assert str(info.value) == ("--collate broken_collate failed on a batch of 4 items (the first is item 0): ValueError: "
                               "cannot pad 4 items; fix it (its traceback is logged above)")
    assert 'raise ValueError(f"cannot pad {len(items)} items")' in caplog.text
    # in hand: a callable, recorded by its name
    survey = extract_from(Embedder(), data, "", ["embed"], collate=pad_ids, batch_size=4, dry_run=True, progress=False)
    assert survey.problems() == [] and survey.layers[0].tokens == (5, 6)
    assert main(["extract", "--model", "test_extract:Embedder", "--dataset", "test_extract:Sentences", "--layers", "embed",
                 "--batch-size", "4", "--collate", "test_extract:pad_ids", "--dry-run"]) == 0
    assert "embed  Embedding      1  Tensor(4, 5, 4) float32  5-6 tokens of (4,) float16, ragged" in capsys.readouterr().out

def test_an_error_mid_run_keeps_the_committed_rows_and_says_how_to_resume(tmp_path, caplog):
    def fail(rows):
        if rows >= 16:
            raise RuntimeError("out of memory (simulated)")

    out = str(tmp_path / "s.h5")
    with pytest.raises(RuntimeError, match="simulated"):
        extract(options(tmp_path, commit_rows=8, command="marstore extract ..."), on_batch=fail)
    with open_store(out) as store:
        assert (store.status, store.rows) == ("incomplete", 16)
    assert (f"stopped by RuntimeError: {out} keeps its 16 committed rows; once the cause is fixed, resume with: "
            "marstore extract ... --resume") in [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert extract(options(tmp_path, commit_rows=8, resume=True)).rows == 40


def test_a_compressed_extraction_stopped_mid_run_reads_its_rows_and_resumes_to_the_same_activations(tmp_path):
    # a compressed layer's rows past its last whole chunk are in its tail until the store is complete
    def fail(rows):
        if rows >= 16:
            raise RuntimeError("out of memory (simulated)")

    plain, packed = str(tmp_path / "plain.h5"), str(tmp_path / "s.h5")
    extract(options(tmp_path, out=plain, commit_rows=8))
    with pytest.raises(RuntimeError, match="simulated"):
        extract(options(tmp_path, commit_rows=8, compression="lzf"), on_batch=fail)
    with open_store(packed) as store, open_store(plain) as reference:
        assert (store.status, store.rows) == ("incomplete", 16)
        tailed = [n for n in store.layers if store.file["activations"][n].shape[0] < 16]
        assert tailed  # the chunks hold more than 16 rows: those rows are all in the tails
        for name in store.layers:
            assert store.read(name).tobytes() == reference.read(name, 0, 16).tobytes(), name
    assert extract(options(tmp_path, commit_rows=8, compression="lzf", resume=True)).rows == 40
    with open_store(packed) as store, open_store(plain) as reference:
        assert store.status == "complete"
        for name in store.layers:
            assert store.file["activations"][name].compression == "lzf"
            assert store.file["activations"][name][:].tobytes() == reference.read(name).tobytes(), name


def test_a_seeded_sample_is_the_same_for_the_same_seed(tmp_path):
    def drawn(name, seed):
        extract(options(tmp_path, out=str(tmp_path / name), num_samples=10, sample_seed=seed))
        with open_store(str(tmp_path / name)) as store:
            return store.file["index"][:].tolist()

    first, again, other = drawn("a.h5", 3), drawn("b.h5", 3), drawn("c.h5", 4)
    assert first == again != other
    assert len(set(first)) == 10 and first == sorted(first) and first != list(range(10)) and max(first) < 40


def test_a_data_set_shorter_than_num_samples_says_so(tmp_path, caplog):
    assert extract(options(tmp_path, num_samples=50)).rows == 40
    assert ("marstore.models:synthetic_video_actions has 40 items, fewer than --num-samples 50: all 40 are extracted"
            in [r.getMessage() for r in caplog.records if r.levelname == "WARNING"])


def test_a_stream_shorter_than_num_samples_says_so(tmp_path, caplog):
    result = extract(options(tmp_path, dataset="helpers.streams:synthetic_stream", dataset_args={"size": 13},
                             num_samples=20))
    assert result.rows == 13
    assert "the data set ended after 13 items, before --num-samples 20: the store holds fewer rows" in caplog.text


def test_an_iterable_data_set_resumes_after_its_committed_items(tmp_path):
    from marstore.extract import Interrupted

    whole = extract(options(tmp_path, out=str(tmp_path / "whole.h5"), dataset="helpers.streams:synthetic_stream",
                            num_samples=36, commit_rows=8))
    batches = []

    def stop_after_two(rows):
        batches.append(rows)
        if len(batches) == 2:
            raise KeyboardInterrupt

    opts = options(tmp_path, dataset="helpers.streams:synthetic_stream", num_samples=36, commit_rows=8)
    with pytest.raises(Interrupted) as info:
        extract(opts, on_batch=stop_after_two)
    assert info.value.rows == 16
    resumed = extract(dataclasses.replace(opts, resume=True))
    assert resumed.rows == 36
    assert_same_store(whole.path, resumed.path)


def run_cli(*args, **popen):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.Popen([sys.executable, "-m", "marstore", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


@pytest.mark.parametrize("signum, workers", [(signal.SIGINT, "0"), (signal.SIGINT, "2"), (signal.SIGTERM, "2")])
def test_ctrl_c_or_sigterm_commits_and_resume_finishes_identically(tmp_path, signum, workers):
    ckpt = str(tmp_path / "c.pt")
    torch.manual_seed(0)
    save_checkpoint(video_mar(**CONFIG), CONFIG, ckpt, "workspace")
    common = ["extract", "--checkpoint", ckpt, "--config-key", "cfg.policy.model", "--model", "marstore.models:video_mar",
              "--dataset", "marstore.models:synthetic_video_actions", "--dataset-arg", "size=3000",
              "--forward", "marstore.models:policy_forward", "--layers", "encoder_blocks.*", "--targets", "nactions",
              "--batch-size", "8", "--commit-rows", "64", "--no-progress", "--device", "cpu", "--workers", workers]
    reference = str(tmp_path / "ref.h5")
    assert run_cli(*common, "--out", reference).wait(timeout=300) == 0
    out = str(tmp_path / "run.h5")
    p = run_cli(*common, "--out", out, start_new_session=True)  # its own process group, as a terminal's job
    deadline = time.time() + 120
    while time.time() < deadline:  # wait for the first commits
        time.sleep(0.2)
        if os.path.exists(out):
            try:
                with open_store(out) as s:
                    if s.rows >= 128:
                        break
            except Exception:  # noqa: BLE001 - the file may be mid-creation
                pass
    # what Ctrl-C in a terminal does, and a scheduler's SIGTERM: every process of the job, data workers too
    os.killpg(p.pid, signum)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signum, err
    how = "interrupted" if signum == signal.SIGINT else "stopped by SIGTERM"
    assert f"marstore extract: {how} after " in err and "--resume" in err
    with open_store(out) as s:
        assert s.status == "incomplete" and 0 < s.rows < 3000 and s.rows % 8 == 0
    p = run_cli(*common, "--out", out, "--resume")
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    with open_store(reference) as a, open_store(out) as b:
        assert a.rows == b.rows == 3000 and b.status == "complete"
        for name in a.layers:
            assert a.read(name).tobytes() == b.read(name).tobytes()
        assert a.index().tolist() == b.index().tolist()
        assert a.target("nactions").tobytes() == b.target("nactions").tobytes()


def test_a_rows_random_draws_depend_on_the_seed_and_its_source_index_alone(tmp_path, capsys):
    """MAR draws its masks from numpy's global generator (the built-in MAR too, drop_masked=True),
    a data set its augmentations from any of the three: each item and each batch's forward are
    seeded from --seed and the source index, so that a second run, a resume, any number of
    workers and a dry run all draw what one uninterrupted run does; another seed draws anew."""
    from marstore.extract import SEEDING

    def run(out, **kw):
        return extract(options(tmp_path, out=str(tmp_path / out), layers=["encoder_blocks.1"], commit_rows=8,
                               model_args={**CONFIG, "drop_masked": True}, **kw))

    def rows(path, layer="encoder_blocks.1"):
        with open_store(path) as s:
            assert s.status == "complete" and s.index().tolist() == list(range(40))
            return [r.tobytes() for r in s.read(layer)], s.metadata["seeding"]

    first, seeding = rows(run("first.h5").path)
    assert seeding == SEEDING
    with open_store(tmp_path / "first.h5") as s:  # its forward sets the same task mode in its default dict each call
        assert s.metadata["state_changes"] == []
    assert rows(run("second.h5").path)[0] == first
    assert rows(run("workers.h5", workers=2).path)[0] == first
    assert rows(run("seed1.h5", seed=1).path)[0] != first
    capsys.readouterr()
    assert main(["info", str(tmp_path / "seed1.h5")]) == 0
    assert "  seed: 1, per item and per batch, from the seed and the source index" in capsys.readouterr().out.splitlines()
    # stopped after three batches, then resumed: the rows after the resume point are drawn as before
    with pytest.raises(Interrupted):
        extract(options(tmp_path, out=str(tmp_path / "resumed.h5"), layers=["encoder_blocks.1"], commit_rows=8,
                        model_args={**CONFIG, "drop_masked": True}), on_batch=ctrl_c_after(3))
    assert rows(run("resumed.h5", resume=True).path)[0] == first
    # the dry run meets the token counts the run stores
    survey = run("unused.h5", dry_run=5)
    with open_store(tmp_path / "first.h5") as s:
        counts = s.token_counts("encoder_blocks.1")
    (layer,) = survey.layers
    assert layer.tokens == (counts.min(), counts.max()) and len(set(counts.tolist())) > 1
    with pytest.raises(ExtractError, match=r"^--seed -1: give an integer of at least 0$"):
        options(tmp_path, seed=-1)


def ctrl_c_after(batches: int):
    """An on_batch callback that stops the run as Ctrl-C does after so many batches."""
    seen = []

    def on_batch(rows: int) -> None:
        seen.append(rows)
        if len(seen) == batches:
            raise KeyboardInterrupt

    return on_batch


def test_a_data_sets_and_a_forwards_draws_repeat_with_workers_and_after_a_resume(tmp_path):
    """Draws in a data set's __getitem__ (an augmentation), in an iterable's items and in the
    forward (a diffusion loss's noise), from torch's, numpy's and Python's generators: the same
    rows with workers and after a resume. extract_from gives the caller's generators back."""
    from marstore.extract import extract_from

    noisy = dict(model="helpers.random_draws:noisy_forward", dataset="helpers.random_draws:noisy_items", forward=None,
                 layers=["fc", "out"], targets=["x"], model_args={}, dataset_args={}, commit_rows=8)
    reference = extract(options(tmp_path, out=str(tmp_path / "noisy.h5"), **noisy)).path
    with open_store(reference) as s:
        want = [s.read(n).tobytes() for n in ("fc", "out")] + [s.target("x").tobytes()]
    with pytest.raises(Interrupted):
        extract(options(tmp_path, out=str(tmp_path / "noisy_resumed.h5"), workers=2, **noisy), on_batch=ctrl_c_after(3))
    stream = {"dataset": "helpers.random_draws:noisy_stream", "num_samples": 40}  # read again up to the resume point
    with pytest.raises(Interrupted):
        extract(options(tmp_path, out=str(tmp_path / "stream_resumed.h5"), **{**noisy, **stream}), on_batch=ctrl_c_after(3))
    for path, kw in ((tmp_path / "noisy_workers.h5", {"workers": 2}), (tmp_path / "noisy_resumed.h5", {"resume": True}),
                     (tmp_path / "stream_resumed.h5", {"resume": True, **stream})):
        with open_store(extract(options(tmp_path, out=str(path), **{**noisy, **kw})).path) as s:
            assert [s.read(n).tobytes() for n in ("fc", "out")] + [s.target("x").tobytes()] == want
    # extract_from gives the caller's generators back as they were
    from helpers.random_draws import noisy_forward, noisy_items
    model = noisy_forward()
    np.random.seed(5)
    random.seed(5)
    torch.manual_seed(5)
    expected = (np.random.rand(), random.random(), torch.rand(1).item())
    np.random.seed(5)
    random.seed(5)
    torch.manual_seed(5)
    extract_from(model, noisy_items(16), str(tmp_path / "from.h5"), "fc", batch_size=8, progress=False)
    assert (np.random.rand(), random.random(), torch.rand(1).item()) == expected


def plain_rows(model, layer, train=False, device="cpu"):
    """A plain loop's captures of one module over helpers.inplace:tokens, 16 items, in batches of 4."""
    from helpers.inplace import tokens

    data, kept = tokens(), []
    handle = model.get_submodule(layer).register_forward_hook(lambda m, a, o: kept.append(o.detach().cpu()))
    model.train(train)
    with torch.inference_mode(not train):
        for start in range(0, 16, 4):
            model(torch.stack([data[i] for i in range(start, start + 4)]).to(device))
    handle.remove()
    return torch.cat(kept)


def test_a_forward_that_changes_the_models_state_is_said_and_recorded(tmp_path, caplog, capsys, monkeypatch):
    """A model that carries state from one forward to the next (a memory bank) may make each row
    depend on the batches before it: the run watches the second batch (the first may build
    caches once), runs it again from the state it left to see whether the rows depend on that
    state, puts the state back, and says and records what it found; a dry run too."""
    from helpers import stateful

    def run(model, out, **kw):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="marstore.extract"):
            result = extract(ExtractOptions(**{"out": str(tmp_path / out), "model": f"helpers.stateful:{model}",
                                               "dataset": "helpers.inplace:tokens", "layers": ["fc"], "batch_size": 4,
                                               "progress": False, "device": "cpu", **kw}))
        said = [(r.levelname, r.getMessage()) for r in caplog.records if r.getMessage().startswith("the forward changes")]
        return result, said

    def stored(result, layer="fc"):
        with open_store(result.path) as s:
            return s.read(layer), s.metadata["state_changes"], s.metadata["state_dependent_layers"]

    changes = "bank (a buffer), memory (a tensor attribute, replaced), calls (an attribute: 1 -> 2)"
    depends = ("a row depends on the batches before it, and a resume, another --batch-size or another order of the data "
               "gives other rows")
    note = (f"the forward changes the model's own state ({changes}), and the rows depend on it (the second batch, run "
            f"again from the state it left, gave other values for fc): {depends}")
    result, said = run("remembers", "remembers.h5")
    assert said == [("WARNING", note)]
    rows, state, dependent = stored(result)
    assert state == ["bank (a buffer)", "memory (a tensor attribute, replaced)", "calls (an attribute: 1 -> 2)"]
    assert dependent == ["fc"]
    torch.manual_seed(0)  # as extract() seeds before it builds the model
    assert rows.tobytes() == plain_rows(stateful.remembers(), "fc").half().numpy().tobytes()  # the state was put back
    capsys.readouterr()
    assert main(["info", result.path]) == 0
    assert f"  the forward changed the model's own state (the rows of fc depend on it): {changes}" \
        in capsys.readouterr().out.splitlines()
    survey, said = run("remembers", "unused.h5", dry_run=2)
    assert note in survey.describe().splitlines() and said == []
    # too large to keep a copy of: not run again, and said as what it may do
    monkeypatch.setattr(extract_module, "STATE_COPY_BYTES", 0)
    result, said = run("remembers", "uncopied.h5")
    assert said == [("WARNING", "the forward changes the model's own state (bank (a buffer, changed in place), memory (a "
                                "tensor attribute, replaced), calls (an attribute: 1 -> 2)): where a later forward reads "
                                f"it, {depends}")]
    assert stored(result)[2] is None
    assert main(["info", result.path]) == 0
    assert "the forward changed the model's own state (where a later forward reads it, rows depend on the batches before " \
        "them)" in capsys.readouterr().out
    monkeypatch.undo()
    # a generator of its own, which --seed does not reach: put back too
    result, said = run("own_noise", "own_noise.h5")
    rows, state, dependent = stored(result)
    assert (state, dependent, said[0][0]) == (["noise (a random generator, advanced)"], ["fc"], "WARNING")
    torch.manual_seed(0)
    assert rows.tobytes() == plain_rows(stateful.own_noise(), "fc").half().numpy().tobytes()
    # state written and never read back: a note, not a warning
    for model, change in (("fills_its_default", "FillsItsDefault.forward's extra (a mutable default argument, filled)"),
                          ("keeps_the_last", "last (a tensor attribute, replaced)")):
        result, said = run(model, f"{model}.h5")
        assert said == [("INFO", f"the forward changes the model's own state ({change}), but the rows do not depend on "
                                 "it: the second batch, run again from the state it left, gave the same activations")]
        assert stored(result)[1:] == ([change], [])
        assert main(["info", result.path]) == 0
        assert f"the forward changed the model's own state (the rows do not depend on it): {change}" in capsys.readouterr().out
    # running the batch again fails: said, not known, and the run goes on
    result, said = run("refuses_a_repeat", "refuses.h5")
    assert said == [("WARNING", "the forward changes the model's own state (seen (a tensor attribute, replaced)): where "
                                f"a later forward reads it, {depends}")]
    assert ("running the second batch again failed (ValueError: the same batch twice): whether the rows depend on the "
            "state it changed is not known") in caplog.messages
    assert stored(result)[1:] == (["seen (a tensor attribute, replaced)"], None) and result.rows == 16
    # batch norm in train mode normalises by the batch: its running statistics are written, not read
    result, said = run("normed", "normed.h5", layers=["2"], train_mode=True, unfold_batch=True)
    rows, state, dependent = stored(result, "2")
    assert state == ["2.running_mean (a buffer)", "2.running_var (a buffer)", "2.num_batches_tracked (a buffer)"]
    assert dependent == [] and said[0][0] == "INFO"
    # a table built at the first call alone, and a model without state: nothing said
    for model in ("caches_once", "normed"):
        result, said = run(model, f"{model}_quiet.h5", layers=["0"] if model == "normed" else ["fc"])
        assert said == [] and stored(result, "0" if model == "normed" else "fc")[1:] == ([], None)
        survey, _ = run(model, "unused.h5", dry_run=2, layers=["0"] if model == "normed" else ["fc"])
        assert "the model's own state" not in survey.describe()
    # one batch: nothing to watch
    result, said = run("remembers", "one.h5", batch_size=16)
    assert said == [] and stored(result)[1] is None


@requires_cuda
def test_the_run_again_check_on_the_gpu_puts_the_state_back(tmp_path):
    from helpers.stateful import remembers

    result = extract(ExtractOptions(out=str(tmp_path / "s.h5"), model="helpers.stateful:remembers",
                                    dataset="helpers.inplace:tokens", layers=["fc"], batch_size=4, progress=False,
                                    device="cuda"))
    with open_store(result.path) as s:
        assert s.metadata["state_dependent_layers"] == ["fc"]
        rows = s.read("fc")
    torch.manual_seed(0)
    assert rows.tobytes() == plain_rows(remembers().cuda(), "fc", device="cuda").half().numpy().tobytes()


def test_the_state_a_second_forward_changed_is_put_back_after_it_runs_again(tmp_path):
    """What the run again changes goes back: a filled default argument counts each batch once,
    batch norm's running statistics are a plain loop's."""
    from helpers.inplace import tokens
    from helpers.stateful import FillsItsDefault, normed
    from marstore.extract import extract_from

    extra = inspect.signature(FillsItsDefault.forward).parameters["extra"].default
    calls = extra.get("calls", 0)
    extract_from(FillsItsDefault(), tokens(), str(tmp_path / "a.h5"), "fc", batch_size=4, progress=False)
    assert extra["calls"] == calls + 4
    torch.manual_seed(0)
    model, plain = normed(), normed()
    plain.load_state_dict(model.state_dict())
    extract_from(model, tokens(), str(tmp_path / "b.h5"), "2", batch_size=4, progress=False, train_mode=True,
                 unfold_batch=True)
    with open_store(tmp_path / "b.h5") as s:
        assert s.metadata["state_dependent_layers"] == []
        rows = s.read("2")
    assert rows.tobytes() == plain_rows(plain, "2", train=True).half().numpy().tobytes()
    for name, value in plain.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


def test_ctrl_c_finishes_the_batch_in_hand_and_a_second_stops_at_once(tmp_path, caplog):
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    def ctrl_c(times):
        def on_batch(rows):
            if rows == 24:
                for _ in range(times):
                    signal.raise_signal(signal.SIGINT)
        return on_batch

    with pytest.raises(Interrupted) as info:
        extract(options(tmp_path), on_batch=ctrl_c(1))
    # the first Ctrl-C came in the third batch's callback: the loop stopped before the fourth
    assert info.value.rows == 24
    assert "Ctrl-C: stopping after the batch in hand" in caplog.text
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with open_store(str(tmp_path / "s.h5")) as s:
        assert (s.status, s.rows, s.index().tolist()) == ("incomplete", 24, list(range(24)))

    with pytest.raises(Interrupted) as info:
        extract(options(tmp_path, out=str(tmp_path / "t.h5")), on_batch=ctrl_c(2))
    assert info.value.rows == 24  # the second raised inside the callback, after the batch was queued
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigterm_stops_like_ctrl_c_and_its_handler_is_restored(tmp_path, caplog):
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    with pytest.raises(Interrupted) as info:
        extract(options(tmp_path), on_batch=lambda rows: rows == 16 and signal.raise_signal(signal.SIGTERM))
    assert (info.value.rows, info.value.signum) == (16, signal.SIGTERM)
    assert str(info.value).startswith("stopped by SIGTERM after 16 committed rows; resume with: ")
    assert "SIGTERM: stopping after the batch in hand and committing it (SIGTERM again stops at once)" in caplog.text
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    with open_store(str(tmp_path / "s.h5")) as s:
        assert (s.status, s.rows) == ("incomplete", 16)


def test_ctrl_c_during_the_closing_commit_only_says_to_wait(tmp_path, caplog, monkeypatch):
    from marstore.store import StoreWriter

    close = StoreWriter.close

    def impatient_close(self, *args, **kwargs):
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)
        return close(self, *args, **kwargs)

    monkeypatch.setattr(StoreWriter, "close", impatient_close)
    result = extract(options(tmp_path))
    assert result.rows == 40
    assert caplog.text.count("the rows written are being committed; wait") == 2
    with open_store(result.path) as s:
        assert (s.status, s.rows) == ("complete", 40)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_callers_own_sigint_handler_stays_in_charge(tmp_path):
    seen = []
    previous = signal.signal(signal.SIGINT, lambda *_: seen.append("caller"))
    try:
        result = extract(options(tmp_path), on_batch=lambda rows: rows == 24 and signal.raise_signal(signal.SIGINT))
        assert seen == ["caller"] and result.rows == 40
        assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_resume_keeps_a_ragged_layer_ragged(tmp_path):
    from marstore.extract import Interrupted

    calls = []

    def stop_after_two(rows):
        calls.append(rows)
        if len(calls) == 4:  # Ctrl-C after four batches: one batch of 8 is left, too few to show raggedness
            raise KeyboardInterrupt

    opts = options(tmp_path, layers=["encoder_blocks.1"], model_args={**CONFIG, "drop_masked": True}, commit_rows=8)
    with pytest.raises(Interrupted) as info:
        extract(opts, on_batch=stop_after_two)
    assert info.value.rows == 32  # every batch queued before Ctrl-C is committed
    result = extract(options(tmp_path, layers=["encoder_blocks.1"], model_args={**CONFIG, "drop_masked": True},
                             commit_rows=8, resume=True))
    with open_store(result.path) as s:
        assert (s.status, s.rows, s.layers["encoder_blocks.1"].layout) == ("complete", 40, "ragged")
        assert s.index().tolist() == list(range(40))


def test_the_summary_names_rates_layers_and_outputs():
    from marstore.extract import ExtractResult, describe

    result = ExtractResult(rows=1024, seconds=2.0, bytes=1 << 20, file_bytes=3 << 19,
                           layers={"encoder_blocks.0": {"layout": "dense", "row_shape": [64], "nonfinite": 2, "overflow": 1}},
                           load_report={}, path="a.h5", outputs={"loss": {"batches": 32, "mean": 0.15312, "nonfinite": 0}})
    assert describe(result).splitlines() == [
        "wrote 1024 rows (1.0 MiB of activations) to a.h5 in 2.0 s (512 rows/s, 0.50 MB/s; file 1.5 MiB)",
        "  encoder_blocks.0             dense  row (64,)  nonfinite 2, overflow 1",
        "  output loss: mean 0.1531 over 32 batches, 0 non-finite",
        "  checkpoint: none recorded (the model ran with the weights it had)",
    ]
    assert "(80.0 MiB of activations) to a.h5 in 2.0 s (512 rows/s, 40 MB/s;" in describe(dataclasses.replace(result, bytes=80 << 20))
    report = {"checkpoint": {"path": "/c/ck.pt", "sha256": "ab" * 32}, "config_key": None, "state_key": "(bare state dict)",
              "loaded": 28, "missing_count": 0, "unexpected_count": 0, "shape_mismatches_count": 0}
    assert describe(dataclasses.replace(result, load_report=report)).splitlines()[-1] == (
        "  checkpoint /c/ck.pt (sha256 abababababab...), no config (--model-arg values only), "
        "weights from '(bare state dict)'; loaded 28 tensors, 0 missing, 0 unexpected, 0 shape mismatches")
    assert "config from 'cfg', weights" in describe(dataclasses.replace(result, load_report={**report, "config_key": "cfg"}))


def test_a_run_the_disk_cannot_take_is_refused_before_the_store_is_made(tmp_path, monkeypatch, caplog):
    import marstore.extract as ex

    with open_store(extract(options(tmp_path, out=str(tmp_path / "sized.h5"))).path) as s:
        row = 8 + sum(math.prod(layer.row_shape) * 2 for layer in s.layers.values())
        row += sum(math.prod(ds.shape[1:]) * ds.dtype.itemsize for ds in s.targets.values())
    need = 40 * row  # 40 rows: two layers of float16 tokens, nactions, label and the source index
    monkeypatch.setattr(ex, "room_left", lambda path, size: (need - 1, "free on its filesystem"))
    with pytest.raises(ExtractError, match=rf"^{tmp_path}/s.h5: this run needs {ex.human_bytes(need)} \(40 rows of "
                                           rf"{ex.human_bytes(row)}\) but only {ex.human_bytes(need - 1)} are free on its "
                                           r"filesystem; make room, write elsewhere \(--out\), reduce the tokens"):
        extract(options(tmp_path))
    assert not (tmp_path / "s.h5").exists()
    monkeypatch.setattr(ex, "room_left", lambda path, size: (need, "free on its filesystem"))
    assert extract(options(tmp_path)).rows == 40
    # ragged token counts come from the first batches: an estimate, so a warning
    monkeypatch.setattr(ex, "room_left", lambda path, size: (1000, "free on its filesystem"))
    with caplog.at_level("WARNING", logger="marstore.extract"):
        result = extract(options(tmp_path, out=str(tmp_path / "ragged.h5"), layers=["encoder_blocks.1"],
                                 model_args={**CONFIG, "drop_masked": True}))
    assert result.rows == 40 and "ragged.h5: this run needs about " in caplog.text


def test_sizes_read_as_people_write_them():
    assert [human_bytes(n) for n in (0, 1023, 1024, 1536 << 20, 3 << 40, 5 << 50)] == [
        "0 bytes", "1023 bytes", "1.0 KiB", "1.5 GiB", "3.0 TiB", "5120.0 TiB"]


class Loud(nn.Module):
    """One linear layer whose outputs are 1, 7e4 and -1e5: two of three past float16's range."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(2, 3)
        with torch.no_grad():
            self.proj.weight.zero_()
            self.proj.bias.copy_(torch.tensor([1.0, 7e4, -1e5]))

    def forward(self, x):
        return self.proj(x).sum()


def loud_model(**config):
    return Loud()


def loud_forward(model, batch):
    return model(batch["nactions"][:, 0])


def test_values_past_float16_are_counted_and_named(tmp_path, caplog):
    kw = dict(model="test_extract:loud_model", forward="test_extract:loud_forward", layers=["proj"])
    with caplog.at_level("WARNING", logger="marstore.extract"):
        result = extract(options(tmp_path, **kw))
    assert result.layers["proj"] == {"nonfinite": 0, "overflow": 80, "layout": "dense", "row_shape": [3]}
    assert ("finite values past float16's range were stored as inf (proj: 80); --dtype bfloat16 or float32 keeps them"
            in caplog.text)
    with open_store(result.path) as s:
        assert s.read("proj").tolist() == [[1.0, float("inf"), float("-inf")]] * 40
    caplog.clear()
    with caplog.at_level("WARNING", logger="marstore.extract"):
        result = extract(options(tmp_path, out=str(tmp_path / "f32.h5"), dtype="float32", **kw))
    assert result.layers["proj"]["overflow"] == 0 and "past float16" not in caplog.text
    with open_store(result.path) as s:
        assert s.read("proj").tolist() == [[1.0, 7e4, -1e5]] * 40


def forward_with_predictions(model, batch):
    loss = policy_forward(model, batch)[0]
    return {"loss": loss, "pred": torch.zeros(len(batch["label"]), 3)}


def test_parts_of_the_return_that_are_not_scalars_are_named_once(tmp_path, caplog):
    with caplog.at_level("INFO", logger="marstore.extract"):
        result = extract(options(tmp_path, forward="test_extract:forward_with_predictions"))
    said = [r.getMessage() for r in caplog.records if "not kept from the forward's return" in r.getMessage()]
    assert said == ["not kept from the forward's return (only scalars go to /outputs): pred: a tensor of shape (8, 3)"]
    assert list(result.outputs) == ["loss"] and result.outputs["loss"]["batches"] == 5


def mutating_forward(model, batch):
    """Mutates its inputs in place, as UVA's forward does with proprioception_input."""
    out = policy_forward(model, batch)
    batch["nactions"].mul_(0)
    batch["label"] += 100
    return out


def test_targets_are_read_before_the_forward_can_change_them(tmp_path):
    result = extract(options(tmp_path, forward="test_extract:mutating_forward"))
    ds = synthetic_video_actions(40)
    with open_store(result.path) as s:
        assert s.target("label").tolist() == [ds[i]["label"] for i in range(40)]
        assert s.target("nactions").tobytes() == torch.stack([ds[i]["nactions"] for i in range(40)]).numpy().tobytes()


class LabelledPairs(torch.utils.data.Dataset):
    """(features, label) items, as torchvision's data sets give them."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.full((4,), float(i)), i % 3


def test_a_target_is_stored_under_the_name_given_to_its_path(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4))
    result = extract_from(model, LabelledPairs(), str(tmp_path / "s.h5"), ["0"], forward=lambda m, b: m(b[0]),
                          targets=["label=1", "0"], batch_size=4, progress=False)
    with open_store(result.path) as s:
        assert sorted(s.targets) == ["0", "label"] and s.target("label").tolist() == [i % 3 for i in range(10)]
        assert s.metadata["options"]["targets"] == ["label=1", "0"]
    survey = extract_from(model, LabelledPairs(), str(tmp_path / "dry.h5"), ["0"], forward=lambda m, b: m(b[0]),
                          targets=["label=1"], batch_size=4, dry_run=True)
    assert [(t.name, t.row, t.dtype, t.problem) for t in survey.targets] == [("label", (), "int64", None)]
    for targets, error in [(["=1"], "--targets '=1': give a dotted path"), (["label="], "--targets 'label=': give a dotted path"),
                           (["a/b"], "--targets 'a/b': give a dotted path into the batch (label, obs.agent_pos, 1), or NAME=PATH "
                                     "to store it under another name (one without '/')"),
                           (["label=1", "label=0"], "--targets names label more than once; give each once")]:
        with pytest.raises(ExtractError, match="^" + re.escape(error)):
            options(tmp_path, targets=targets)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_a_config_file_holds_the_options_and_the_command_line_wins(tmp_path, suffix, capsys):
    import json

    import yaml


    config = {"model": "marstore.models:video_mar", "model_args": CONFIG, "dataset": "marstore.models:synthetic_video_actions",
              "dataset_args": {"size": 12}, "forward": "marstore.models:policy_forward", "layers": ["encoder_blocks.*"],
              "targets": ["label"], "output_names": ["loss", "video_loss", "act_loss"], "batch_size": 8, "device": "cpu"}
    path = tmp_path / f"run{suffix}"
    path.write_text(yaml.safe_dump(config) if suffix == ".yaml" else json.dumps(config))
    out = str(tmp_path / "s.h5")
    assert main(["extract", "--config", str(path), "--batch-size", "4", "--out", out, "--no-progress"]) == 0
    with open_store(out) as s:
        options = s.metadata["options"]
        assert (options["batch_size"], options["dataset_args"], options["layers"]) == (4, {"size": 12}, ["encoder_blocks.*"])
        assert s.rows == 12 and list(s.outputs()) == ["row_start", "loss", "video_loss", "act_loss"]
        assert s.outputs()["row_start"].tolist() == [0, 4, 8]
    path.write_text(json.dumps({**config, "bogus": 1, "layer": "x"}))
    with pytest.raises(SystemExit, match=r"--config .*: unknown options \['bogus', 'layer'\] \(did you mean layer -> "
                                         r"layers\?\); the options are the long flags with _ for -$"):
        main(["extract", "--config", str(path), "--out", str(tmp_path / "t.h5")])



@pytest.mark.parametrize("text, error", [
    ("out: [1,", r"--config .*bad\.yaml: cannot read it \(while parsing a flow node .* line 1, column 9\)$"),
    ("- out", r"--config .*bad\.yaml holds a list; give a mapping of options \(out: \.\.\., layers: \[\.\.\.\]\)$"),
])
def test_a_config_file_that_cannot_be_read_is_refused_in_one_line(tmp_path, text, error):

    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit, match=error):
        main(["extract", "--config", str(path)])
    with pytest.raises(SystemExit, match=r"--config .*nowhere\.json: cannot read it \(\[Errno 2\] No such file"):
        main(["extract", "--config", str(tmp_path / "nowhere.json")])


@pytest.mark.parametrize("line, error", [
    ("seed: abc", "--seed 'abc': give an integer"),
    ("batch_size: 2.5", "--batch-size 2.5: give an integer"),
    ("seed: true", "--seed True: give an integer"),
    ("stop_early: 'no'", "--stop-early 'no': give true or false"),
    ("skip_failed: 'yes'", "--skip-failed 'yes': give true or false"),
    ("layers: 5", "--layers 5: give a list of names"),
    ("targets: [label, 2]", "--targets ['label', 2]: give a list of names"),
    ("model_args: [1]", r"model_args [1]: give a mapping of KEY: VALUE (--model-arg KEY=VALUE on the command line)"),
    ("reduction: [mean]", "--reduction ['mean']: give a string"),
    ("channels_first: 5", "--channels-first 5: give true or false or a list of names"),
    ("layer_reductions: [x]", "layer_reductions ['x']: give a mapping of PATTERN: REDUCTION (--layer-reduction "
                              "PATTERN=REDUCTION on the command line)"),
    ("layer_reductions: {x: null}", "layer_reductions {'x': None}: give a mapping of PATTERN: REDUCTION "
                                    "(--layer-reduction PATTERN=REDUCTION on the command line)"),
    ("unfold_batch: 4", "--unfold-batch 4: give true or false or a string or a mapping of PATTERN: LAYOUT "
                        "(--unfold-batch PATTERN=LAYOUT on the command line)"),
])
def test_a_config_value_of_the_wrong_type_is_refused_before_the_run(tmp_path, capsys, line, error):

    path = tmp_path / "run.yaml"
    path.write_text("model: marstore.models:video_mar\ndataset: marstore.models:synthetic_video_actions\n"
                    "layers: [encoder_blocks.*]\n" + line + "\n")
    out = tmp_path / "s.h5"
    assert main(["extract", "--config", str(path), "--out", str(out)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"marstore extract: {error}"
    assert not out.exists()


def test_every_true_flag_of_a_config_file_holds_unless_the_command_line_sets_it(tmp_path):
    # --skip-failed in a config file was overridden by the absent flag's False
    from marstore.cli import _options_from, build_parser
    from marstore.extract import ExtractOptions

    flags = [k for k, f in ExtractOptions.__dataclass_fields__.items()
             if f.type == "bool" and f.default is False and k != "resume"]
    assert {"strict", "skip_failed", "stop_early", "train_mode"} <= set(flags)
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"model": "m:f", "dataset": "d:f", "layers": ["x"], "out": "o.h5", **dict.fromkeys(flags, True)}))
    opts = _options_from(build_parser().parse_args(["extract", "--config", str(path)]))
    assert {k: getattr(opts, k) for k in flags} == dict.fromkeys(flags, True)


def test_unfold_batch_alone_with_one_layout_or_with_a_layout_a_pattern(tmp_path):
    from marstore.cli import _options_from, build_parser

    def parsed(*args, config=None):
        if config is not None:
            (tmp_path / "run.json").write_text(json.dumps(config))
            args = ("--config", str(tmp_path / "run.json"), *args)
        return _options_from(build_parser().parse_args(["extract", "--model", "m:f", "--dataset", "d:f", "--layers", "x",
                                                        "--out", "o.h5", *args])).unfold_batch

    assert parsed() is False and parsed("--unfold-batch") is True and parsed("--unfold-batch", "(k b)") == "(k b)"
    assert parsed("--unfold-batch", "diffloss.**=(m=4 b t)", "diffactloss.conv=(b k)") == {
        "diffloss.**": "(m=4 b t)", "diffactloss.conv": "(b k)"}
    assert parsed(config={"unfold_batch": {"diffloss": "(m=4 b t)"}}) == {"diffloss": "(m=4 b t)"}
    assert parsed(config={"unfold_batch": True}) is True and parsed("--unfold-batch", "(k b)", config={"unfold_batch": True}) == "(k b)"
    for wrong in (["diffloss", "(b k)"], ["(b k)", "(k b)"], ["diffloss=b k"]):
        with pytest.raises(SystemExit) as info:
            parsed("--unfold-batch", *wrong)
        assert str(info.value) == (f"marstore extract: --unfold-batch {wrong[0]!r}: give one LAYOUT for every layer, such "
                                   "as '(k b)', or PATTERN=LAYOUT for each, such as 'diffloss.net.**=(m=4 b t)'")


def test_an_unknown_option_is_refused_by_its_command_with_the_nearest_one(capsys):
    for argv, said in [
        (["probe", "s.h5", "--targt", "y"], "marstore probe: error: unrecognized arguments: --targt y (--targt: did you mean --target?)"),
        (["extract", "--batchsize=3", "--chekpoint", "c.pt"], "marstore extract: error: unrecognized arguments: --batchsize=3 "
         "--chekpoint c.pt (--batchsize: did you mean --batch-size?; --chekpoint: did you mean --checkpoint?)"),
        (["probe", "s.h5", "--probe", "mlp"], "marstore probe: error: unrecognized arguments: --probe mlp"),  # nothing near
        (["info", "s.h5", "stray"], "marstore info: error: unrecognized arguments: stray"),
    ]:
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2 and capsys.readouterr().err.splitlines()[-1] == said


def test_missing_extract_options_are_named():
    with pytest.raises(SystemExit, match=r"^marstore extract: missing --out, --dataset \(or give them in --config\)$"):
        main(["extract", "--model", "m:f", "--layers", "x"])
    with pytest.raises(SystemExit, match=r"^marstore extract: missing --layers \(or give it in --config\)$"):
        main(["extract", "--model", "m:f", "--dataset", "d:f", "--out", "o.h5"])


def test_verbose_goes_before_or_after_the_command():
    from marstore.cli import build_parser

    assert [build_parser().parse_args(argv).verbose for argv in (["-v", "info", "s.h5"], ["info", "s.h5", "-v"],
                                                                 ["info", "--verbose", "s.h5"], ["info", "s.h5"])] == [
        True, True, True, False]
    # -v is marstore's debug messages, not those of every library it uses
    marstore_log = logging.getLogger("marstore")
    try:
        assert main(["info", "nowhere.h5", "-v"]) == 2
        assert marstore_log.level == logging.DEBUG and not logging.getLogger("h5py").isEnabledFor(logging.DEBUG)
    finally:
        marstore_log.setLevel(logging.NOTSET)


def test_a_tuple_option_is_kept_as_the_list_a_resume_reads_back(tmp_path):
    assert options(tmp_path, layers=("encoder_blocks.0", "encoder_blocks.1")).layers == ["encoder_blocks.0", "encoder_blocks.1"]
    assert options(tmp_path, reduction=[0, 5, 9]).reduction == "0,5,9"  # token indices as a YAML list
    assert options(tmp_path, reduction=0).reduction == "0"  # as --reduction 0 gives it: the first token
    assert options(tmp_path, layer_reductions={"z_proj": [0, 1], "decoder_norm": 3}).layer_reductions == \
        {"z_proj": "0,1", "decoder_norm": "3"}
    assert options(tmp_path, channels_first=("a", "b")).channels_first == ["a", "b"]

@requires_cuda
def test_forward_outputs_on_the_gpu_come_through_the_ring(tmp_path):
    # the losses stay on the device until the slot's copy lands: same values as reading them at once
    named = ["loss", "video_loss", "act_loss"]
    result = extract(options(tmp_path, device="cuda", output_names=named))
    torch.manual_seed(0)
    model = video_mar(**CONFIG).eval().cuda()
    ds = synthetic_video_actions(size=40)
    expected = []
    with torch.inference_mode():
        for start in range(0, 40, 8):
            batch = torch.utils.data.default_collate([ds[i] for i in range(start, start + 8)])
            expected.append([float(v) for v in policy_forward(model, {k: v.cuda() for k, v in batch.items()})])
    with open_store(result.path) as s:
        got = s.outputs()
        assert list(got) == ["row_start", *named] and got["row_start"].tolist() == [0, 8, 16, 24, 32]
        assert np.column_stack([got[n] for n in named]).tolist() == expected


def _hooks_left(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_extract_from_objects_writes_what_the_specs_write_and_leaves_the_model_as_it_was(tmp_path, caplog):
    from marstore.extract import extract_from

    torch.manual_seed(0)
    path = str(tmp_path / "c.pt")
    save_checkpoint(video_mar(**CONFIG), CONFIG, path, "workspace")
    extract(options(tmp_path, out=str(tmp_path / "spec.h5"), checkpoint=path, config_key="cfg.policy.model", model_args={}))
    model = video_mar(**CONFIG)  # other weights, until the checkpoint's are loaded into it
    model.train()
    with caplog.at_level(logging.INFO, logger="marstore.extract"):
        result = extract_from(model, synthetic_video_actions(size=40), str(tmp_path / "obj.h5"), "encoder_blocks.*",
                              forward=policy_forward, checkpoint=path, config_key="cfg.policy.model",
                              targets=["nactions", "label"], batch_size=8, progress=False)
    assert result.rows == 40 and result.load_report["loaded"] == len(model.state_dict())
    assert_same_store(str(tmp_path / "spec.h5"), str(tmp_path / "obj.h5"))
    assert model.training and _hooks_left(model) == 0  # its mode back, every hook removed
    assert torch.equal(model.decoder_norm.weight, read_checkpoint(path)["state_dicts"]["ema_model"]["model.decoder_norm.weight"])
    assert "the checkpoint's config ('cfg.policy.model') is recorded; the model handed over was built without it" in caplog.text
    assert "malloc:" not in caplog.text  # a notebook's process goes on: its malloc is left alone
    with open_store(str(tmp_path / "obj.h5")) as s:
        recorded = {k: s.metadata[k] for k in ("model", "dataset", "dataset_args", "forward", "model_args", "command")}
        assert recorded == {"model": "<object marstore.models.video_mar.VideoActionMAR>",
                            "dataset": "<object marstore.models.data.SyntheticVideoActions>", "dataset_args": {},
                            "forward": "<object marstore.models.video_mar.policy_forward>", "model_args": {}, "command": None}
        assert s.metadata["checkpoint"]["sha256"] == loading_digest(path)
        assert s.metadata["model_config"] == CONFIG

    # without a checkpoint the model runs with its own weights, in eval mode, and is put back in eval mode
    model.eval()
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    extract_from(model, synthetic_video_actions(size=40), str(tmp_path / "own.h5"), ["encoder_blocks.*"],
                 forward=policy_forward, targets=["nactions", "label"], batch_size=8, progress=False)
    assert not model.training and torch.equal(torch.rand(3), expected)  # the caller's random generator as it was
    assert_same_store(str(tmp_path / "spec.h5"), str(tmp_path / "own.h5"))  # the weights loaded above


def test_extract_from_gives_the_model_back_without_inference_tensors(tmp_path, caplog):
    """The run's forwards run under inference mode: what the model stores then (a table built at
    its first call, a memory bank's buffer) would refuse autograd when the caller trains the
    model next; extract_from gives such tensors back as normal copies."""
    from helpers.inplace import tokens
    from helpers.stateful import caches_once, remembers

    from marstore.extract import extract_from

    for model, kept in ((caches_once(), "table"), (remembers(), "memory")):  # its bank only changed in place
        with caplog.at_level(logging.INFO, logger="marstore.extract"):
            extract_from(model, tokens(16), str(tmp_path / f"{type(model).__name__}.h5"), "fc", batch_size=4, progress=False)
        assert (f"the model keeps tensors made during the run under inference mode ({kept}): given back as normal "
                "copies, so that autograd can use them") in caplog.messages
        model(torch.randn(2, 3, 8)).sum().backward()  # "Inference tensors cannot be saved for backward" before
        assert model.fc.weight.grad is not None
        assert not any(b.is_inference() for b in model.buffers())


def loading_digest(path: str) -> str:
    from marstore.loading import file_digest

    return file_digest(path).sha256


def test_extract_from_resumes_from_python_and_names_its_data_set(tmp_path):
    from marstore.extract import extract_from

    torch.manual_seed(0)
    model, data = video_mar(**CONFIG), synthetic_video_actions(size=40)
    kw = dict(forward=policy_forward, targets=["nactions", "label"], batch_size=8, commit_rows=8, progress=False,
              dataset_name="synthetic/40")
    out = str(tmp_path / "s.h5")
    with pytest.raises(Interrupted) as info:
        extract_from(model, data, out, "encoder_blocks.*", on_batch=lambda rows: rows == 16 and _raise(KeyboardInterrupt), **kw)
    assert info.value.rows == 16
    assert str(info.value).endswith(f"resume with: extract_from(model, dataset, {out!r}, ..., resume=True)")
    with pytest.raises(ExtractError, match=r"options differ .*: dataset \(recorded 'synthetic/40', now "
                                           r"'<object marstore\.models\.data\.SyntheticVideoActions>'\)$"):
        extract_from(model, data, out, "encoder_blocks.*", resume=True, **{**kw, "dataset_name": None})
    assert extract_from(model, data, out, "encoder_blocks.*", resume=True, **kw).rows == 40
    extract_from(model, data, str(tmp_path / "ref.h5"), "encoder_blocks.*", **kw)
    assert_same_store(out, str(tmp_path / "ref.h5"))
    with open_store(out) as s:
        assert (s.status, s.metadata["dataset"]) == ("complete", "synthetic/40")


def _raise(exc):
    raise exc


def test_extract_from_refuses_what_it_cannot_take_in_one_line(tmp_path):
    from marstore.extract import extract_from

    model, data = video_mar(**CONFIG), synthetic_video_actions(size=8)
    out = str(tmp_path / "s.h5")
    with pytest.raises(TypeError, match=r"^extract_from\(\) got dataset_args, model_args: it takes the model, the data set, "
                                        r"the forward and the collate as objects"):
        extract_from(model, data, out, "encoder_blocks.*", model_args={"depth": 2}, dataset_args={})
    with pytest.raises(TypeError, match=r"^extract_from\(\) got unknown options batchsize; it takes allow_missing, autocast, "
                                        r"batch_size, .* workers$"):
        extract_from(model, data, out, "encoder_blocks.*", batchsize=4)
    with pytest.raises(TypeError, match=r"^extract_from\(\): the model is a function, not a torch.nn.Module$"):
        extract_from(video_mar, data, out, "encoder_blocks.*")
    with pytest.raises(ExtractError, match=r"^the data set handed over is a int: neither a map-style data set"):
        extract_from(model, 5, out, "encoder_blocks.*")
    with pytest.raises(ExtractError, match=r"^the data set handed over is a DataLoader: give its data set \(loader\.dataset\); "
                                           r"marstore batches the items itself"):
        extract_from(model, torch.utils.data.DataLoader(data, batch_size=4), out, "encoder_blocks.*")
    with pytest.raises(hooks.HookError, match=r"'encoder_blok\.\*' matches no module; did you mean 'encoder_blocks\.\*' "
                                              r"\(it matches 2\)\? nearest names: \['encoder_blocks\.0'"):
        extract_from(model, data, out, "encoder_blok.*")
    assert not os.path.exists(out) and _hooks_left(model) == 0


def test_extract_from_leaves_the_model_where_it_is_unless_told(tmp_path, monkeypatch):
    from marstore.extract import extract_from

    model, data = video_mar(**CONFIG), synthetic_video_actions(size=8)
    moves = []
    original = nn.Module.to
    monkeypatch.setattr(nn.Module, "to", lambda self, *a, **k: moves.append((type(self).__name__, a, k)) or original(self, *a, **k))
    kw = dict(forward=policy_forward, targets=["label"], batch_size=8, progress=False)
    extract_from(model, data, str(tmp_path / "a.h5"), "encoder_blocks.0", **kw)
    assert [m for m in moves if m[0] == "VideoActionMAR"] == []  # a model split over devices would be gathered by .to()
    extract_from(model, data, str(tmp_path / "b.h5"), "encoder_blocks.0", device="cpu", **kw)
    assert [m[1] for m in moves if m[0] == "VideoActionMAR"] == [(torch.device("cpu"),), (torch.device("cpu"),)]  # there, back


@requires_cuda
def test_extract_from_runs_the_model_where_its_weights_are(tmp_path):
    from marstore.extract import extract_from

    model, data = video_mar(**CONFIG), synthetic_video_actions(size=8)
    kw = dict(forward=policy_forward, targets=["label"], batch_size=8, progress=False)
    extract_from(model, data, str(tmp_path / "cpu.h5"), "encoder_blocks.0", **kw)  # not moved to the GPU
    assert next(model.parameters()).device.type == "cpu"
    extract_from(model.cuda(), data, str(tmp_path / "gpu.h5"), "encoder_blocks.0", **kw)
    assert next(model.parameters()).is_cuda
    extract_from(model, data, str(tmp_path / "moved.h5"), "encoder_blocks.0", device="cpu", **kw)
    assert next(model.parameters()).is_cuda  # moved for the run, and back
    with open_store(str(tmp_path / "gpu.h5")) as s:
        assert s.rows == 8


@requires_cuda
def test_a_forward_that_draws_on_the_gpu_draws_the_same_after_a_resume(tmp_path):
    """The device's generator is seeded with each batch, as the CPU's: the NoisyForward's
    torch.randn_like draws on the GPU."""
    noisy = dict(model="helpers.random_draws:noisy_forward", dataset="helpers.random_draws:noisy_items", forward=None,
                 layers=["out"], targets=[], model_args={}, dataset_args={}, commit_rows=8, device="cuda")
    whole = extract(options(tmp_path, out=str(tmp_path / "whole.h5"), **noisy)).path
    with pytest.raises(Interrupted):
        extract(options(tmp_path, out=str(tmp_path / "resumed.h5"), **noisy), on_batch=ctrl_c_after(2))
    resumed = extract(options(tmp_path, out=str(tmp_path / "resumed.h5"), resume=True, **noisy)).path
    with open_store(whole) as a, open_store(resumed) as b:
        assert a.rows == b.rows == 40 and a.read("out").tobytes() == b.read("out").tobytes()
