"""The hardware catalogue of the cost model: what one accelerator and its links can do, each figure with its public
source (docs/simulation.md lists them again), and the efficiencies this project assumes on top of them.

A `Hardware` is peak figures (published) times achieved fractions (assumed, or measured: `host_hardware` builds
this machine's entry from a calibration run, benchmarks/validate_cost_model.py). Bandwidths are per GPU and per
direction, in bytes/s: a link sold as "900 GB/s bidirectional" moves 450e9 bytes/s each way.

Published (NVIDIA data sheets and product pages; dense = without the 2:4 sparsity the headline figures assume):

    GPU        dense bf16     HBM      HBM bandwidth   NVLink (bidir.)   network per GPU
    H100 SXM   989 TFLOP/s    80 GB    3.35 TB/s       900 GB/s          400 Gb/s (ConnectX-7)
    H200 SXM   989 TFLOP/s    141 GB   4.8 TB/s        900 GB/s          400 Gb/s (ConnectX-7)
    B200       2.25 PFLOP/s   180 GB   8 TB/s          1.8 TB/s          400 Gb/s (ConnectX-7)
    B300       2.25 PFLOP/s   288 GB   8 TB/s          1.8 TB/s          800 Gb/s (ConnectX-8)

Fitted and assumed (this project's, not published; the same for every GPU unless stated): bf16 matrix products reach
`gemm_efficiency` = 0.52 of the dense peak and attention kernels (flash-style, causal) `attention_efficiency` = 0.18,
both fitted on the calibration half of the published runs (FITTED; docs/simulation.md, "Validation on published
runs"); collectives `link_efficiency` = 0.80 of a link's bandwidth (a stated prior the calibration runs do not
constrain, VALIDATED), memory-bound operators `memory_efficiency` = 0.75 of the HBM bandwidth (stated), a latency
of 5 µs per step within a node and 15 µs across nodes, and 8 GPUs per node. ranges.py gives each its range.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

__all__ = ["Hardware", "CATALOGUE", "get_hardware", "host_hardware", "FITTED", "GEMM_SPAN", "VALIDATED"]

# Fitted on the calibration half of the published runs (simulate/planning/published.py; split and fit in
# validation.py): `python benchmarks/validate_published.py` prints the fit; docs/simulation.md reports it with the
# held-out half. Every GPU of the catalogue takes these points.
FITTED = {"gemm_efficiency": 0.52, "attention_efficiency": 0.18, "link_efficiency": 0.80}
# The calibration runs' scatter: the 10th and 90th percentile of the factor on gemm_efficiency each would need.
GEMM_SPAN = (0.80, 1.29)
# Which assumptions the calibration runs constrain (moving one across its range worsens their agreement by more
# than validation.CONSTRAINED): the others are stated, and a plan that rests on one of them says so.
VALIDATED = {"gemm_efficiency": True, "attention_efficiency": True, "link_efficiency": False,
             "memory_efficiency": False, "overlap": False}


@dataclass(frozen=True)
class Hardware:
    """One accelerator (or one CPU core, for the host) and the links between them."""

    name: str
    peak_flops: float  # dense bf16 FLOP/s per GPU
    hbm_bytes: float  # memory per GPU
    hbm_bandwidth: float  # bytes/s
    intra_node_bandwidth: float  # bytes/s per GPU per direction (NVLink)
    inter_node_bandwidth: float  # bytes/s per GPU per direction (the GPU's network card)
    ranks_per_node: int = 8
    gemm_efficiency: float = FITTED["gemm_efficiency"]
    attention_efficiency: float = FITTED["attention_efficiency"]
    memory_efficiency: float = 0.75
    link_efficiency: float = FITTED["link_efficiency"]
    intra_node_latency: float = 5e-6  # s per ring step
    inter_node_latency: float = 15e-6
    # Ranks that share one compute unit (the host: ranks over cores); 1 on GPUs, one rank per GPU.
    ranks_per_compute: float = 1.0
    # Measured [seconds per call, seconds per unit of work] of named operators (the host's calibration), overriding
    # the peak figures.
    op_rates: dict = field(default_factory=dict)
    sources: dict = field(default_factory=dict)

    def link(self, tier: str) -> tuple[float, float]:
        """(bytes/s, s per ring step) of a link tier, "intra-node" or "inter-node", efficiencies applied."""
        if tier == "intra-node":
            return self.intra_node_bandwidth * self.link_efficiency, self.intra_node_latency
        return self.inter_node_bandwidth * self.link_efficiency, self.inter_node_latency


_NVIDIA_H100 = "https://www.nvidia.com/en-us/data-center/h100/ (H100 SXM column)"
_NVIDIA_H200 = "https://www.nvidia.com/en-us/data-center/h200/ (H200 SXM column)"
_NVIDIA_HGX = "https://www.nvidia.com/en-us/data-center/hgx/ (HGX B300 and HGX B200 columns, per 8 GPUs)"
_DGX_H100 = "https://docs.nvidia.com/dgx/dgxh100-user-guide/introduction-to-dgxh100.html (8x ConnectX-7, 400 Gb/s)"
_DGX_B200 = "https://docs.nvidia.com/dgx/dgxb200-user-guide/introduction-to-dgxb200.html (8x ConnectX-7, 400 Gb/s)"
_DGX_B300 = "https://www.nvidia.com/en-us/data-center/dgx-b300/ (8x ConnectX-8 SuperNIC, 800 Gb/s)"

CATALOGUE: dict[str, Hardware] = {
    "h100": Hardware("H100 SXM", 989e12, 80e9, 3.35e12, 450e9, 50e9,
                     sources={"peak_flops": _NVIDIA_H100 + ": BF16 1,979 TFLOPS with sparsity", "hbm": _NVIDIA_H100,
                              "nvlink": _NVIDIA_H100 + ": NVLink 900 GB/s", "network": _DGX_H100}),
    "h200": Hardware("H200 SXM", 989e12, 141e9, 4.8e12, 450e9, 50e9,
                     sources={"peak_flops": _NVIDIA_H200 + ": BF16 1,979 TFLOPS with sparsity", "hbm": _NVIDIA_H200,
                              "nvlink": _NVIDIA_H200 + ": NVLink 900 GB/s", "network": _DGX_H100}),
    "b200": Hardware("B200", 2.25e15, 180e9, 8e12, 900e9, 50e9,
                     sources={"peak_flops": _NVIDIA_HGX + ": FP16/BF16 36 PFLOPS with sparsity", "hbm": _NVIDIA_HGX
                              + ": 1.4 TB, 64 TB/s", "nvlink": _NVIDIA_HGX + ": 1.8 TB/s GPU-to-GPU",
                              "network": _DGX_B200}),
    "b300": Hardware("B300", 2.25e15, 288e9, 8e12, 900e9, 100e9,
                     sources={"peak_flops": _NVIDIA_HGX + ": FP16/BF16 36 PFLOPS with sparsity", "hbm": _NVIDIA_HGX
                              + ": 2.3 TB, 64 TB/s", "nvlink": _NVIDIA_HGX + ": 1.8 TB/s GPU-to-GPU",
                              "network": _DGX_B300}),
}


def get_hardware(name: str) -> Hardware:
    """The catalogue entry (h100, h200, b200, b300; case and a trailing "-sxm" ignored); ValueError in one line."""
    key = name.lower().removesuffix("-sxm").replace(" ", "")
    if key not in CATALOGUE:
        raise ValueError(f"unknown GPU {name!r}; the catalogue has {', '.join(CATALOGUE)}")
    return CATALOGUE[key]


def host_hardware(calibration: dict, ranks: int) -> Hardware:
    """This machine as the cost model's hardware, from a calibration (benchmarks/validate_cost_model.py): seconds
    per call and per unit of work of each operator measured in one process on one core, memory copy and MPI link
    speeds measured between two ranks, and the core count; `ranks` ranks share the cores (a rank gets cores/ranks
    of one when there are more ranks than cores, as every rank of an MPI job busy-waits while it waits)."""
    c = calibration
    rate = c["link_bytes_per_s"]
    return replace(CATALOGUE["h100"], name=f"host ({c['cores']} cores)", peak_flops=c["gemm_flops_per_s"],
                   hbm_bytes=c["memory_bytes"], hbm_bandwidth=c["copy_bytes_per_s"], intra_node_bandwidth=rate,
                   inter_node_bandwidth=rate, ranks_per_node=max(ranks, 1), gemm_efficiency=1.0,
                   attention_efficiency=1.0, memory_efficiency=1.0, link_efficiency=1.0,
                   intra_node_latency=c["link_latency_s"], inter_node_latency=c["link_latency_s"],
                   ranks_per_compute=max(1.0, ranks / c["cores"]), op_rates=dict(c["op_rates"]),
                   sources={"calibration": "measured on this machine (benchmarks/validate_cost_model.py)"})

