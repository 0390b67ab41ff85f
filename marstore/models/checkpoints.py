"""Saves a model in each checkpoint layout that users hand over (FIELD-NOTES §1)."""

from __future__ import annotations

import argparse
import copy
import warnings

import torch

LAYOUTS = ("bare", "model_state_dict", "mar", "lightning", "workspace", "ddp", "compile", "fsdp", "deepspeed", "dit", "timm",
           "ema_pytorch", "lightning_ema")


def _prefixed(state: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in state.items()}


def save_checkpoint(model: torch.nn.Module, config: dict, path: str, layout: str, ema: torch.nn.Module | None = None) -> None:
    """Writes model (and EMA weights, default: a perturbed copy) in the given layout; "fsdp" is
    a folder that torch.distributed.checkpoint writes, as FSDP's sharded checkpoints are."""
    state = model.state_dict()
    if ema is None:
        ema = copy.deepcopy(model)
        with torch.no_grad():
            for p in ema.parameters():
                p.mul_(0.5)  # distinct from the raw weights, so tests can tell which were loaded
    ema_state = ema.state_dict()
    if layout == "bare":
        obj = state
    elif layout == "model_state_dict":
        obj = {"model_state_dict": state, "model_config": config}
    elif layout == "mar":  # MAR's checkpoint-last.pth
        obj = {"model": state, "model_ema": ema_state, "optimizer": {}, "epoch": 3, "scaler": {},
               "args": argparse.Namespace(**config)}
    elif layout == "lightning":
        obj = {"state_dict": _prefixed(state, "model."), "hyper_parameters": config, "epoch": 3}
    elif layout == "lightning_ema":  # a LightningModule holding timm's ModelEmaV2 beside its model
        obj = {"state_dict": {**_prefixed(state, "model."), **_prefixed(ema_state, "model_ema.module.")},
               "hyper_parameters": config, "epoch": 3}
    elif layout == "workspace":  # diffusion_policy: the whole policy, MAR under model.
        extras = {"vae_model.encoder.weight": torch.zeros(2, 2), "normalizer.params.scale": torch.ones(3)}
        obj = {"cfg": {"policy": {"model": config}},
               "state_dicts": {"model": {**_prefixed(state, "model."), **extras},
                               "ema_model": {**_prefixed(ema_state, "model."), **extras},
                               "optimizer": {}, "lr_scheduler": {}},
               "pickles": {}}
    elif layout == "dit":  # DiT's train.py, and its descendants'
        obj = {"model": state, "ema": ema_state, "opt": {}, "args": argparse.Namespace(**config)}
    elif layout == "timm":  # timm's CheckpointSaver
        obj = {"epoch": 3, "arch": "video_mar", "state_dict": state, "optimizer": {}, "version": 2,
               "args": argparse.Namespace(**config), "state_dict_ema": ema_state}
    elif layout == "ema_pytorch":  # lucidrains' ema_pytorch: its EMA holds the EMA copy and the online model
        obj = {"model": state, "ema": {**_prefixed(ema_state, "ema_model."), **_prefixed(state, "online_model."),
                                       "initted": torch.tensor(True), "step": torch.tensor(3)},
               "config": config}
    elif layout == "ddp":
        obj = {"model_state_dict": _prefixed(state, "module."), "model_config": config}
    elif layout == "compile":
        obj = {"model_state_dict": _prefixed(state, "_orig_mod."), "model_config": config}
    elif layout == "deepspeed":  # a DeepSpeed checkpoint's mp_rank_00_model_states.pt (ZeRO stages 1 and 2)
        obj = {"module": state, "buffer_names": [], "optimizer": None, "ds_config": {"train_batch_size": 8},
               "ds_version": "0.14.0", "global_steps": 3}
    elif layout == "fsdp":  # torchtitan's and FSDP2's: model and optimizer state, a folder of shards
        moments = {i: {"exp_avg": torch.zeros_like(p), "step": torch.tensor(3.0)} for i, p in enumerate(model.parameters())}
        obj = {"model": state, "optimizer": {"state": moments, "param_groups": [{"lr": 1e-4, "params": list(moments)}]},
               "model_config": config, "step": 3}
        import torch.distributed.checkpoint as dcp  # here: only this layout needs it, and it takes a moment to import

        with warnings.catch_warnings():  # one process, no process group: as meant here
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(obj, checkpoint_id=path)
        return
    else:
        raise ValueError(f"layout {layout!r}: use one of {LAYOUTS}")
    torch.save(obj, path)
