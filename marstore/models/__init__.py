"""A small built-in video-action MAR model and synthetic data, for the demo and the tests."""

from marstore.models.checkpoints import LAYOUTS, save_checkpoint
from marstore.models.data import SyntheticVideoActions, synthetic_video_actions
from marstore.models.video_mar import VideoActionMAR, dynamic_forward, policy_forward, sampling_forward, video_mar

__all__ = ["LAYOUTS", "save_checkpoint", "SyntheticVideoActions", "synthetic_video_actions", "VideoActionMAR",
           "dynamic_forward", "policy_forward", "sampling_forward", "video_mar"]
