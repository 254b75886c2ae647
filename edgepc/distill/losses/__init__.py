"""Distillation losses, one file each, all found by name in one registry."""

from edgepc.distill.losses import crd, dist, fitnet, kd, pc, pkt, rkd_angle, rkd_distance, sp
from edgepc.distill.losses.registry import build_loss, loss_class, loss_names, register_loss

__all__ = [
    "build_loss",
    "crd",
    "dist",
    "fitnet",
    "kd",
    "loss_class",
    "loss_names",
    "pc",
    "pkt",
    "register_loss",
    "rkd_angle",
    "rkd_distance",
    "sp",
]
