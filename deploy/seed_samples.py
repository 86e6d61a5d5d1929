"""Fill an S3 prefix with optimizr's sample library: the `seed` service of docker-compose.yml.

``python3 seed_samples.py s3://BUCKET/PREFIX [--photos N]`` draws the samples
(``optimizr.samples``) into a temporary folder and PUTs each file under the prefix. The
store is the one the ``AWS_*`` variables name, read by obstore as optimizr reads them
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``).
It waits for the store to answer first (a fresh SeaweedFS takes seconds to accept
requests), so compose can start it with the server.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import obstore
from obstore.exceptions import BaseError
from obstore.store import S3Store

from optimizr.samples import write_samples

READY_TIMEOUT = 120.0  # seconds: a cold SeaweedFS on a busy machine, with room to spare


def open_store(url: str) -> S3Store:
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    if not url.startswith("s3://") or not bucket:
        raise SystemExit(f"seed: {url}: want s3://BUCKET/PREFIX")
    # Plain HTTP and path-style: a local S3-compatible server, as in the compose file.
    return S3Store(
        bucket,
        prefix=prefix.strip("/") or None,
        virtual_hosted_style_request=False,
        client_options={"allow_http": True},
    )


def wait_until_ready(store: S3Store, url: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            obstore.list_with_delimiter(store)  # one LIST request
            return
        except BaseError as exc:
            cause = str(exc).splitlines()[0]  # obstore appends a multi-line debug dump
            # obstore says most S3 failures as GenericError: a refusal (wrong keys) is
            # told by its status, and is final; anything else (not listening yet, no
            # bucket yet) is retried until the deadline.
            if "403 Forbidden" in cause or "401 Unauthorized" in cause:
                raise SystemExit(f"seed: {url} refused the credentials: {cause}") from exc
            if time.monotonic() > deadline:
                said = f"seed: {url} did not answer in {READY_TIMEOUT:.0f} s: {cause}"
                raise SystemExit(said) from exc
            time.sleep(1.0)  # polling interval of a readiness loop, not a race


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="s3://BUCKET/PREFIX to fill")
    parser.add_argument("--photos", type=int, default=0, help="more photos (samples --photos)")
    args = parser.parse_args(argv)
    store = open_store(args.url)
    wait_until_ready(store, args.url)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        write_samples(root, extra_photos=args.photos)
        files = sorted(path for path in root.rglob("*") if path.is_file())
        for path in files:
            obstore.put(store, path.relative_to(root).as_posix(), path.read_bytes())
    print(f"seed: put {len(files)} files under {args.url.rstrip('/')}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
