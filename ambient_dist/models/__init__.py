"""The networks: EDM-preconditioned U-Nets (DDPM++, NCSN++, ADM), built from the config.

    net = build_network(cfg)            # Precond: D(x; sigma) = c_skip x + c_out F(c_in x, c_noise)
    D = net(x, sigma, labels)           # x0 prediction, float32
    F = net.raw(net_in, c_noise, labels)  # the U-Net alone (what the objective calls)

Modules: `layers` (blocks and initialisation), `song_unet` (DDPM++ / NCSN++), `adm_unet`
(ADM), `precond` (EDM / VP / VE preconditioning, `build_network`), `flops` (FLOP counts).
"""
from .adm_unet import DhariwalUNet
from .precond import EDMPrecond, Precond, VEPrecond, VPPrecond, build_network, build_unet
from .song_unet import SongUNet

__all__ = ["build_network", "build_unet", "Precond", "EDMPrecond", "VPPrecond", "VEPrecond",
           "SongUNet", "DhariwalUNet"]
