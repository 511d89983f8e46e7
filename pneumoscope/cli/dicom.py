"""``pneumoscope dicom listen``: the DICOM Storage SCP (dicom/listen.py); ``pneumoscope dicom sync``: the
DICOMweb pass over an archive (dicom/sync.py)."""
from __future__ import annotations

import argparse
import logging

from pneumoscope.cli.options import check_port_free
from pneumoscope.errors import ConfigError

log = logging.getLogger("pneumoscope")


def _listen(args: argparse.Namespace) -> int:
    from pneumoscope.dicom.listen import Listener, Remote

    try:
        forward = Remote.parse(args.forward_to) if args.forward_to else None
    except ValueError as e:
        raise ConfigError(f"--forward-to {e}") from e
    check_port_free(args.host, args.port)  # before the model loads and the database is created
    allowed = [a.strip() for a in (args.allow_ae or "").split(",") if a.strip()] or None
    if allowed is None:
        log.warning("no --allow-ae: any calling AE title may store images here; list the modalities and PACS "
                    "that may (an AE title is no authentication: keep the port on a trusted network)")
    listener = Listener(args.db, args.checkpoint, ae_title=args.ae_title, forward=forward, allowed_aes=allowed,
                        device=args.device, heatmaps=not args.no_heatmap, outbox=args.outbox,
                        retry_s=args.retry_seconds)
    try:
        listener.start(args.host, args.port, block=True)
    finally:
        listener.close()
    return 0


def _sync(args: argparse.Namespace) -> int:
    import json

    from pneumoscope.dicom.listen import Pipeline
    from pneumoscope.dicom.sync import sync

    pipeline = Pipeline(args.db, args.checkpoint, device=args.device, heatmaps=not args.no_heatmap)
    try:
        print(json.dumps(sync(pipeline, args.dicomweb, since=args.since)))
    finally:
        pipeline.close()
    return 0


def register(sub) -> None:
    p = sub.add_parser("dicom", help="DICOM networking: receive radiographs, send results back")
    dsub = p.add_subparsers(dest="dicom_command", required=True, metavar="COMMAND")
    q = dsub.add_parser("listen", help="DICOM Storage SCP: predict every received radiograph, record it, "
                                       "forward an SR and a Grad-CAM Secondary Capture")
    q.add_argument("--ae-title", default="PNEUMOSCOPE", help="this listener's AE title")
    q.add_argument("--host", default="0.0.0.0", help="address to listen on (default all)")
    q.add_argument("--port", type=int, default=11112)
    q.add_argument("--db", default="pneumoscope-studies.db",
                   help="study database (the same as `pneumoscope serve`'s): SQLite path or URL")
    q.add_argument("--forward-to", metavar="AET@HOST:PORT", help="C-STORE the SR and Secondary Capture there")
    q.add_argument("--outbox", metavar="DIR", help="results wait here until --forward-to has them (default: DB.outbox "
                                                   "beside a SQLite --db, else ./pneumoscope-outbox)")
    q.add_argument("--retry-seconds", type=float, default=30.0,
                   help="how often results the forward target did not take are sent again (default 30)")
    q.add_argument("--allow-ae", metavar="AET,...",
                   help="only these calling AE titles may associate (others are rejected): a security measure")
    q.add_argument("--checkpoint", help="model checkpoint or ONNX file (default: the bundled model)")
    q.add_argument("--device", default="auto")
    q.add_argument("--no-heatmap", action="store_true", help="no Grad-CAM (and so no Secondary Capture)")
    q.set_defaults(func=_listen)
    q = dsub.add_parser("sync", help="DICOMweb: predict the CR/DX studies of an archive, store the SR back "
                                     "(skips studies already assessed by this model)")
    q.add_argument("--dicomweb", required=True, metavar="URL", help="e.g. http://HOST:8042/dicom-web")
    q.add_argument("--since", metavar="DATE", help="only studies from this date on (YYYYMMDD or YYYY-MM-DD)")
    q.add_argument("--db", default="pneumoscope-studies.db", help="study database (as `pneumoscope serve`'s)")
    q.add_argument("--checkpoint", help="model checkpoint or ONNX file (default: the bundled model)")
    q.add_argument("--device", default="auto")
    q.add_argument("--no-heatmap", action="store_true", help="no Grad-CAM (and so no Secondary Capture)")
    q.set_defaults(func=_sync)
