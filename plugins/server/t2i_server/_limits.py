"""What the server accepts: the limits set at start-up, with defaults safe for a shared GPU."""

from __future__ import annotations

import attrs


@attrs.frozen(kw_only=True)
class Limits:
    """Bounds on requests and on the server's memory; every one is a ``t2i serve`` flag.

    A request over a limit is refused before any work with a 4xx error naming the field.
    """

    #: height x width of one image (and at most the engine's own ``max_pixels``): 1536 x 1536
    max_pixels: int = 1536 * 1536
    #: denoising steps of one request (AUTOMATIC1111's own slider stops at 150)
    max_steps: int = 150
    #: images of one request: ``num_images``, or AUTOMATIC1111's ``batch_size`` x ``n_iter``
    max_images: int = 8
    #: bytes of one request body; a larger one is refused with 413 before it is read
    max_body_bytes: int = 8 * 1024 * 1024
    #: height x width of a control image, read from its header before it is decoded
    max_control_pixels: int = 2048 * 2048
    #: controls of one request
    max_controls: int = 4
    #: jobs waiting for each device's worker (the running one not counted); 503 beyond it
    queue_size: int = 32
    #: finished jobs kept, with their images, for ``GET /v1/jobs/{id}`` (oldest dropped first)
    keep_jobs: int = 64
    #: on SIGTERM, seconds that queued and running jobs get to finish before they are cancelled
    shutdown_timeout: float = 30.0
    #: open connections at once; a client beyond them gets 503 at once (a flood of idle connections
    #: cannot starve the server; slow or stalled clients are for a reverse proxy to time out)
    max_connections: int = 256
    #: seconds a connection may stay without sending a complete request (none yet, or a head sent a
    #: byte at a time) before it is closed
    header_timeout: float = 30.0
    #: seconds an ``Idempotency-Key`` gives back its job (while the job is kept: `keep_jobs`)
    idempotency_window: float = 24 * 3600.0
    #: seconds between two latent previews of one job (previews cost a small copy of the latents)
    preview_interval: float = 0.25
