"""`fleetsim bench`: fleet throughput beside a raw SKIP LOCKED reference, and baselines.

- :mod:`fleetsim.bench.reference`: the reference loop (a product feature: run it
  against your own database to see what a bare queue gets there);
- :mod:`fleetsim.bench.storeloop`: the store's own claim loop, without pods;
- :mod:`fleetsim.bench.claimers`: the one harness both loops run in;
- :mod:`fleetsim.bench.fleet`: one fleet trial (a real coordinator and pods);
- :mod:`fleetsim.bench.matrix`: the configurations, interleaved and repeated;
- :mod:`fleetsim.bench.chaos`: failover, re-claim and throughput under faults;
- :mod:`fleetsim.bench.checker`: the checker's time and memory on a synthetic history;
- :mod:`fleetsim.bench.measure`, :mod:`fleetsim.bench.server`: what every trial
  reads (RSS, CPU, percentiles, medians; the server's CPU and transactions);
- :mod:`fleetsim.bench.baseline`: save a baseline, compare a run to one.
"""

from fleetsim.bench.fleet import FleetConfig, FleetResult, run_fleet
from fleetsim.bench.matrix import BenchPlan, BenchReport, run_bench
from fleetsim.bench.reference import ReferenceResult, run_reference

__all__ = [
    "BenchPlan",
    "BenchReport",
    "FleetConfig",
    "FleetResult",
    "ReferenceResult",
    "run_bench",
    "run_fleet",
    "run_reference",
]
