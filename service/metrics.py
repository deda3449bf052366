"""Prometheus metrics. Base units, ``_total`` counters, histograms. ``subnet`` is the sub-network index (0 = widest).

Every app gets its own registry, so several apps (tests, or one per device) never share counters. Per-client
series are kept to :data:`CLIENT_BUCKETS`: a client's ``bucket`` is a salted hash of its identity, so that no
address or key becomes a label and the number of series stays fixed however many clients come.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)

# The *_created series double every counter's cardinality and no dashboard needs them.
disable_created_metrics()

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
CLIENT_BUCKETS = 16


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # process_cpu_seconds_total, process_resident_memory_bytes, ... for the dashboard's process panels
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.requests = Counter("ddsnet_requests", "Requests answered, by quality and HTTP status.",
                                ["quality", "status"], registry=r)
        self.request_seconds = Histogram("ddsnet_request_duration_seconds",
                                         "Time from upload received to response, by sub-network.", ["subnet"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait_seconds = Histogram("ddsnet_queue_wait_seconds", "Time a tile waited in its queue.",
                                            ["subnet"], buckets=LATENCY_BUCKETS, registry=r)
        self.inference_seconds = Histogram("ddsnet_inference_seconds", "Compute time of one batch.", ["subnet"],
                                           buckets=LATENCY_BUCKETS, registry=r)
        self.batch_tiles = Histogram("ddsnet_batch_tiles", "Tiles per batch.", ["subnet"], buckets=BATCH_BUCKETS,
                                     registry=r)
        self.selections = Counter("ddsnet_subnet_selections", "Sub-network chosen per request.",
                                  ["quality", "subnet"], registry=r)
        self.profile_selections = Counter("ddsnet_profile_selections", "Profile chosen per request, and what "
                                          "chose it (gate, jpeg_header or requested).", ["profile", "reason"],
                                          registry=r)
        self.flops = Counter("ddsnet_flops", "FLOPs executed (network and gate).", ["subnet"], registry=r)
        self.flops_widest = Counter("ddsnet_flops_widest_equivalent",
                                    "FLOPs the widest sub-network would have spent on the same work.", registry=r)
        self.queue_tiles = Gauge("ddsnet_queue_tiles", "Tiles waiting, by sub-network.", ["subnet"], registry=r)
        self.pixels = Counter("ddsnet_pixels", "Image pixels denoised.", registry=r)
        self.in_flight = Gauge("ddsnet_requests_in_flight", "Requests being handled.", registry=r)
        self.rejections = Counter("ddsnet_rejections", "Requests refused, by reason.", ["reason"], registry=r)
        self.dropped_tiles = Counter("ddsnet_dropped_tiles", "Queued tiles dropped before running, by reason.",
                                     ["reason"], registry=r)
        self.runtime_backend = Gauge("ddsnet_engine_info", "1 per sub-network for the backend that runs it.",
                                    ["subnet", "backend", "precision"], registry=r)
        self.warmup_seconds = Gauge("ddsnet_warmup_seconds", "Seconds spent building and warming the engines.",
                                    registry=r)
        self.load_downgrades = Counter("ddsnet_load_downgrades", "auto requests run slimmer than the gate's pick "
                                       "to keep the latency target or meet their deadline, by the pick and what "
                                       "ran.", ["from", "to"], registry=r)
        self.latency_target = Gauge("ddsnet_latency_target_seconds", "The controller's latency target (0: off).",
                                    registry=r)
        self.backlog_seconds = Gauge("ddsnet_backlog_seconds", "Estimated seconds to run the queued and running "
                                     "work, from each width's measured speed.", registry=r)
        self.client_queue_tiles = Gauge("ddsnet_client_queue_tiles", "Tiles waiting, by client bucket (a salted "
                                        "hash of the client's identity).", ["bucket"], registry=r)
        self.clients_in_flight = Gauge("ddsnet_clients_in_flight", "Clients with a request admitted and not yet "
                                       "done.", registry=r)
        self.ready = Gauge("ddsnet_ready", "1 once the model is loaded and warmed up.", registry=r)
        self.device_memory = Gauge("ddsnet_device_memory_bytes", "Memory allocated on the GPU by the model.",
                                   registry=r)
