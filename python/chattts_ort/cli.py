"""`chattts-ort` command line: say, serve, export, verify, quantize, memory, demo, bench, info."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _cmd_info(args) -> int:
    from . import __version__
    from ._native import runtime_info

    info = {"chattts_ort": __version__}
    info.update(runtime_info())
    print(json.dumps(info, indent=2))
    return 0


def _cmd_export(args) -> int:
    from .export.exporter import export_model

    rep = export_model(args.src, args.out, force=args.force, progress=not args.quiet, layer_form=args.layer_form,
                       kv_dtype=args.kv_dtype, layers_per_graph=args.layers_per_graph)
    print(f"exported {args.src} -> {rep.out_dir} in {rep.seconds:.1f} s; graphs {rep.total_bytes / 1e6:.1f} MB "
          f"(weights {rep.weight_bytes / 1e6:.1f} MB); peak RSS {rep.peak_rss_mb:.0f} MB")
    if args.verify:
        return _verify(args.out, None, args.quiet, steps=args.steps)
    return 0


def _verify(folder, against, quiet, steps) -> int:
    from .checks.verify import verify_export

    report = verify_export(folder, against=against, progress=not quiet, steps=steps)
    print(report.table())
    print(f"report saved to {report.path}")
    if not report.ok:
        print(f"VERIFICATION FAILED: {', '.join(report.failed)}", file=sys.stderr)
        return 1
    return 0


def _cmd_verify(args) -> int:
    return _verify(args.folder, args.against, args.quiet, steps=args.steps)


def _cmd_quantize(args) -> int:
    from .export.quantize import quantize_export

    rep = quantize_export(args.inp, args.out, plan=args.plan, block_size=args.block_size, force=args.force,
                          progress=not args.quiet)
    print(rep.summary())
    return 0


def _cmd_share_weights(args) -> int:
    from .export.quantize import share_weights_export

    out = share_weights_export(args.inp, args.out, force=args.force, progress=not args.quiet and sys.stderr.isatty())
    print(f"wrote {out}: weights in one .data file per block, pre-packed for this machine (check with "
          f"chattts-ort memory {out} --processes 4)")
    return 0


def _cmd_memory(args) -> int:
    from .memory import load_rss, shared_memory

    if args.processes:
        mb = lambda b: f"{b / 2**20:.0f} MB"  # noqa: E731
        base = shared_memory(None, processes=1)
        print(f"baseline (python, numpy, onnxruntime; no model): PSS {mb(base.pss_total)}")
        for folder in args.folders:
            one = shared_memory(folder, processes=1)
            many = shared_memory(folder, processes=args.processes)
            print(f"{folder}: 1 process PSS {mb(one.pss_total)}; {args.processes} processes at once PSS "
                  f"{mb(many.pss_total)} in all ({many.pss_total / one.pss_total:.2f}x one; each: RSS "
                  f"{mb(many.each[0]['rss'])}, private {mb(many.each[0]['private'])})")
        return 0
    for folder in args.folders:
        rep = load_rss(folder, via=args.via, disable_prepacking=args.no_prepacking)
        print(rep.summary())
    return 0


def _cmd_demo(args) -> int:
    from . import InferCodeParams, Runtime

    from .prepare import resolve_model

    prep = resolve_model(args.model)
    print(prep.why)
    folder = prep.folder
    if args.min_frames is None and prep.random:
        # The random model ends at random; a floor shows the steady speed.
        args.min_frames = min(150, args.frames)
        print(f"the model has random weights: at least {args.min_frames} frames (--min-frames)")
    args.min_frames = args.min_frames or 0
    t_load = time.perf_counter()
    rt = Runtime.load(folder, device=args.device, threads=args.threads)
    t_load = time.perf_counter() - t_load
    params = InferCodeParams(max_new_token=args.frames, manual_seed=args.seed, min_new_token=args.min_frames)
    print(f"model {folder} loaded in {t_load:.2f} s on {args.device}; text: {args.text!r}")
    t0 = time.perf_counter()
    first = None
    n = 0
    last_print = t0
    for frame in rt.stream(args.text, params=params):
        now = time.perf_counter()
        if first is None:
            first = now - t0
        n += 1
        if now - last_print > 0.5 or n == 1:
            el = now - t0
            fps = n / el
            print(f"\rframe {n:5d}  codes {frame.codes.tolist()}  {fps:6.1f} frames/s  "
                  f"RTF {46.875 / fps:5.2f}", end="", flush=True)
            last_print = now
    total = time.perf_counter() - t0
    print()
    audio_s = n / 46.875
    print(f"{n} frames ({audio_s:.2f} s of audio) in {total:.2f} s: time to first frame {1000 * (first or 0):.0f} ms, "
          f"{n / total:.1f} frames/s, real-time factor {total / max(audio_s, 1e-9):.2f} "
          f"(< 1 is faster than real time); stop: {rt.last_stop_reason}")
    return 0


def _voice(spec: str, dim: int):
    """--voice: 'seed:N' (a seeded random speaker), a file holding a spk_emb string or an .npy of values, or a
    spk_emb string itself."""
    import numpy as np

    from .speaker import random_speaker

    if spec is None:
        return None
    if spec.startswith("seed:"):
        return random_speaker(seed=int(spec[5:]), dim=dim)
    p = Path(spec)
    if len(spec) < 4096 and p.is_file():
        return np.load(p) if p.suffix == ".npy" else p.read_text(encoding="utf-8").strip()
    return spec


def _check_say_out(out: Path) -> None:
    """Refuse an --out that cannot be written, before the model loads and the synthesis starts."""
    import os

    if out.suffix.lower() not in (".wav", ".flac", ".ogg"):
        raise ValueError(f"--out {out}: give a .wav (or .flac, .ogg) file name")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out {out}: folder {out.parent} does not exist")
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a folder; give a file name")
    if out.exists() and not out.is_file():
        raise ValueError(f"--out {out} exists and is not a regular file")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {out}: folder {out.parent} is not writable")


def _cmd_say(args) -> int:
    """Text to a WAV file (written to a sibling .NAME.tmp-PID-*.wav and renamed when complete), streamed: each
    chunk is written as it comes, and --play sends it to the sound card as well."""
    import os

    import soundfile as sf

    from . import InferCodeParams, RefineTextParams, Runtime
    from .format import is_no_space, no_space_error, temp_sibling

    out = Path(args.out)
    _check_say_out(out)
    # The sibling is made now (removing what killed writers left beside OUT): a place that cannot be written
    # fails here, before the model loads.
    try:
        tmp = temp_sibling(out, suffix=out.suffix)
    except OSError as e:
        if is_no_space(e):
            raise no_space_error(out) from e
        raise ValueError(f"--out {out}: cannot write a file in {out.parent} ({e.strerror or e})") from None
    rt = player = None
    try:
        player = _player(24000) if args.play else None
        from .prepare import resolve_model

        prep = resolve_model(args.model)
        print(prep.why)
        folder = prep.folder
        rt = Runtime.load(folder, device=args.device, threads=args.threads, strict=args.strict)
        if not rt.has_audio:
            raise RuntimeError(f"{folder}: {rt.no_audio_reason}")
        min_frames = args.min_frames if args.min_frames is not None else (min(150, args.frames) if prep.random else 0)
        params = InferCodeParams(max_new_token=args.frames, min_new_token=min_frames, manual_seed=args.seed,
                                 spk_emb=_voice(args.voice, rt.config["hidden_size"]))
        t0 = time.perf_counter()
        first = None
        n = 0
        with sf.SoundFile(str(tmp), "w", samplerate=rt.sample_rate, channels=1,
                          subtype="PCM_16" if out.suffix.lower() != ".ogg" else "VORBIS") as f:
            refine = RefineTextParams(manual_seed=args.seed) if args.refine else None
            for chunk in rt.stream_audio(args.text, params=params, lookahead=args.lookahead, refine=refine):
                if first is None:
                    first = time.perf_counter() - t0
                f.write(chunk.samples)
                if player is not None:
                    player.write(chunk.samples.reshape(-1, 1))
                n += len(chunk.samples)
        total = time.perf_counter() - t0
        os.replace(tmp, out)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, Exception) and is_no_space(e):
            raise no_space_error(out) from e
        raise
    finally:
        if player is not None:
            player.stop()
            player.close()
    seconds = n / rt.sample_rate
    print(f"wrote {out}: {seconds:.2f} s of audio at {rt.sample_rate} Hz in {total:.2f} s; first audio after "
          f"{1000 * (first or 0):.0f} ms; real-time factor {total / max(seconds, 1e-9):.2f} (< 1 is faster than "
          f"real time); lookahead {args.lookahead if args.lookahead is not None else rt.exact_lookahead} frames; "
          f"stop: {rt.last_stop_reason}")
    rt.close()
    return 0


def _player(rate: int):
    """A started sound-card output stream (the sounddevice package), or a clear error."""
    try:
        import sounddevice as sd
    except (ImportError, OSError) as e:
        raise RuntimeError(f"--play needs the sounddevice package and PortAudio ({e})") from None
    try:
        stream = sd.OutputStream(samplerate=rate, channels=1, dtype="float32")
        stream.start()
    except Exception as e:  # no device, PortAudio errors
        raise RuntimeError(f"--play: no audio output device ({e})") from None
    return stream


def _cmd_serve(args) -> int:
    import os

    from .server import API_KEY_ENV, check_settings, serve

    from .prepare import resolve_model

    if args.api_key is None:
        args.api_key = (os.environ.get(API_KEY_ENV) or "").strip() or None
    limits = dict(max_input_chars=args.max_input_chars, max_body_bytes=args.max_body_bytes,
                  body_timeout=args.body_timeout)
    # every setting is checked before the model resolves or loads: one line, exit 2 (main)
    check_settings(host=args.host, port=args.port, log_level=args.log_level, queue_timeout=args.queue_timeout,
                   api_key=args.api_key, insecure_no_api_key=args.insecure_no_api_key, max_streams=args.max_streams,
                   lookahead=args.lookahead, max_context=args.max_context, max_header_bytes=args.max_header_bytes,
                   header_timeout=args.header_timeout, max_connections=args.max_connections, **limits)
    prep = resolve_model(args.model)
    print(prep.why)
    model = str(prep.folder)
    if args.ray or args.replicas or args.max_replicas or args.ray_address:
        try:
            from .ray_serve import RayServeArgs, run
        except ImportError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        ray_args = RayServeArgs(model=model, max_streams=args.max_streams, threads=args.threads or 2,
                                replicas=args.replicas, max_replicas=args.max_replicas, voices=args.voices,
                                lookahead=args.lookahead, queue_timeout=args.queue_timeout, name=args.name,
                                batch_invariant=not args.no_batch_invariant, max_context=args.max_context,
                                api_key=args.api_key, **limits)
        run(ray_args, host=args.host, port=args.port, address=args.ray_address,
            insecure_no_api_key=args.insecure_no_api_key)
        return 0
    serve(model, host=args.host, port=args.port, max_streams=args.max_streams, threads=args.threads,
          voice_dir=args.voices, lookahead=args.lookahead, queue_timeout=args.queue_timeout, model_name=args.name,
          log_level=args.log_level, batch_invariant=not args.no_batch_invariant, max_context=args.max_context,
          api_key=args.api_key, insecure_no_api_key=args.insecure_no_api_key, max_connections=args.max_connections,
          max_header_bytes=args.max_header_bytes, header_timeout=args.header_timeout, **limits)
    return 0


def _cmd_bench(args) -> int:
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "bench" / "run.py"
    if not script.is_file():
        print("bench/run.py is part of the source tree; run it from a clone: python bench/run.py", file=sys.stderr)
        return 2
    sys.argv = [str(script)] + args.rest
    runpy.run_path(str(script), run_name="__main__")
    return 0


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


MODEL_HELP = ("an export folder, a ChatTTS asset folder, a Hub model (2Noise/ChatTTS[@revision]) or random; default: "
              "ChatTTS's model from the Hub when cached or downloadable, else the random model of its shape")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="chattts-ort", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("info", help="versions, ONNX Runtime library and execution providers")
    s.set_defaults(fn=_cmd_info)

    s = sub.add_parser("export", help="export a ChatTTS asset folder (or the random default) to ONNX blocks")
    s.add_argument("src", help="ChatTTS asset folder, or 'random' (full shape, seeded) / 'random-tiny'")
    s.add_argument("out", help="output folder (must not exist unless --force)")
    s.add_argument("--force", action="store_true", help="replace OUT if it exists")
    s.add_argument("--verify", action="store_true", help="verify every block and the chain right after export")
    s.add_argument("--layers-per-graph", type=_positive_int, default=1, metavar="N",
                   help="decoder layers in each layer graph (1: one graph per layer; 20: one graph for all); "
                        "fused form only")
    s.add_argument("--layer-form", default="fused", choices=["fused", "portable"],
                   help="fused: GroupQueryAttention, KV written in place (default); portable: standard ONNX ops")
    s.add_argument("--kv-dtype", default="fp32", choices=["fp32", "fp16"],
                   help="KV cache precision (fp16: fused form only; halves the cache memory, not faster on CPU)")
    s.add_argument("--steps", type=_positive_int, default=100, help="chain-verification steps (with --verify)")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=_cmd_export)

    s = sub.add_parser("verify", help="per-block parity against PyTorch and chain token identity")
    s.add_argument("folder")
    s.add_argument("--against", default=None, help="an fp32 export folder: report quantization error against it")
    s.add_argument("--steps", type=_positive_int, default=None, help="chain steps (default 100; 200 with --against)")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=_cmd_verify)

    s = sub.add_parser("quantize", help="write a new export whose blocks carry their own precision")
    s.add_argument("inp")
    s.add_argument("out")
    s.add_argument("--plan", default="int8", help="fp16 | int8 | int8-dynamic | int4 | int4-edges | JSON plan")
    s.add_argument("--block-size", type=int, default=32, help="int4 weight block size")
    s.add_argument("--force", action="store_true")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=_cmd_quantize)

    s = sub.add_parser("memory", help="resident memory of loading an export folder, against its weight bytes")
    s.add_argument("folders", nargs="+", metavar="folder")
    s.add_argument("--via", default="runtime", choices=["runtime", "ort"],
                   help="runtime: the C++ core (default); ort: one onnxruntime Python session per block")
    s.add_argument("--no-prepacking", action="store_true",
                   help="turn off ONNX Runtime's weight prepacking (less memory, much slower MatMuls)")
    s.add_argument("--processes", type=_positive_int, default=None, metavar="N",
                   help="load each folder in 1 and then N processes at once and report their summed PSS "
                        "(what N processes serving one export cost; see share-weights)")
    s.set_defaults(fn=_cmd_memory)

    s = sub.add_parser("share-weights", help="a copy of an export whose weights processes share (mapped, "
                                             "pre-packed for this machine)")
    s.add_argument("inp", metavar="IN")
    s.add_argument("out", metavar="OUT")
    s.add_argument("--force", action="store_true", help="replace OUT if it is an export")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(fn=_cmd_share_weights)

    s = sub.add_parser("say", help="speak a sentence into a WAV file, streamed; prints first-audio latency and RTF")
    s.add_argument("text", nargs="?", default="chattts-ort speaks from a native core, as the words are sampled.")
    s.add_argument("-o", "--out", default="say.wav", help="output file: .wav (default say.wav), .flac or .ogg")
    s.add_argument("--model", default=None, help=MODEL_HELP)
    s.add_argument("--voice", default=None,
                   help="speaker: a spk_emb string, a file holding one (or an .npy of values), or seed:N")
    s.add_argument("--lookahead", type=int, default=None,
                   help="frames of lookahead (default: exact, 52; fewer start sooner, see docs/AUDIO.md)")
    s.add_argument("--play", action="store_true", help="also play it (needs sounddevice and an output device)")
    s.add_argument("--refine", action="store_true",
                   help="refine the text first, as ChatTTS's infer() does by default (adds pauses, laughs; costs "
                        "a text-mode generation before the first audio)")
    s.add_argument("--strict", action="store_true",
                   help="refuse text with characters the tokenizer cannot read (default: a warning naming them)")
    s.add_argument("--device", default="cpu")
    s.add_argument("--threads", type=_positive_int, default=None)
    s.add_argument("--frames", type=_positive_int, default=600, help="max_new_token (600 frames = 12.8 s)")
    s.add_argument("--min-frames", type=int, default=None,
                   help="min_new_token (default 0; 150 with the random default model)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=_cmd_say)

    s = sub.add_parser("serve", help="an OpenAI-compatible speech server (POST /v1/audio/speech), streamed")
    s.add_argument("--model", default=None, help=MODEL_HELP)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="1..65535 (default 8000)")
    s.add_argument("--max-streams", type=_positive_int, default=4,
                   help="concurrent requests batched in one decode loop; more wait in a queue")
    s.add_argument("--queue-timeout", type=float, default=30.0,
                   help="seconds a request may wait for a free stream before a 503 (default 30)")
    s.add_argument("--voices", default=None, help="a folder of NAME.txt spk_emb strings, served as voices")
    s.add_argument("--lookahead", type=int, default=None, help="default lookahead of the audio (default: exact)")
    s.add_argument("--threads", type=_positive_int, default=None)
    s.add_argument("--name", default="chattts", help="the model name clients use (OpenAI's tts-1 names work too)")
    s.add_argument("--no-batch-invariant", action="store_true",
                   help="let int4 requests' audio depend on who else runs (saves a row when one runs alone)")
    s.add_argument("--max-context", type=_positive_int, default=None,
                   help="KV positions per stream, allocated at start (default 2048: ~250 MB per stream)")
    s.add_argument("--log-level", default="info", help="uvicorn's: critical, error, warning, info, debug, trace")
    h = s.add_argument_group("access and limits (docs/SERVING.md)")
    h.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every /v1 route (default: $CHATTTS_ORT_API_KEY; "
                        "/health stays open); needed for a --host other than loopback")
    h.add_argument("--insecure-no-api-key", action="store_true",
                   help="serve a non-loopback --host without an API key (anyone who can connect may use it)")
    h.add_argument("--max-input-chars", type=int, default=4096, help="longest input, in characters (OpenAI's 4096)")
    h.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB): 413")
    h.add_argument("--body-timeout", type=float, default=30.0, help="seconds to receive a request body: 408")
    h.add_argument("--header-timeout", type=float, default=10.0, help="seconds to receive a request head: 408")
    h.add_argument("--max-header-bytes", type=int, default=16384, help="largest request head (default 16 KiB): 431")
    h.add_argument("--max-connections", type=int, default=None,
                   help="open connections at most (default 1000, under the file-descriptor limit); past it the "
                        "connection idle longest in its request head is closed")
    g = s.add_argument_group("scale-out on Ray Serve (the ray extra; one engine of --max-streams rows per replica)")
    g.add_argument("--ray", action="store_true", help="serve through Ray Serve's HTTP proxy instead of uvicorn")
    g.add_argument("--replicas", type=_positive_int, default=None, help="a fixed number of replicas (default 1)")
    g.add_argument("--max-replicas", type=_positive_int, default=None,
                   help="autoscale from 1 to this many replicas on ongoing requests")
    g.add_argument("--ray-address", default=None, help="join this Ray cluster (default: a local Ray on this host)")
    s.set_defaults(fn=_cmd_serve)

    s = sub.add_parser("demo", help="stream audio-code frames for a sentence and print the speed")
    s.add_argument("text", nargs="?", default="chattts-ort streams audio codes from a native core.")
    s.add_argument("--model", default=None, help=MODEL_HELP)
    s.add_argument("--device", default="cpu")
    s.add_argument("--threads", type=_positive_int, default=None)
    s.add_argument("--frames", type=_positive_int, default=300, help="max_new_token")
    s.add_argument("--min-frames", type=int, default=None,
                   help="min_new_token (default 0; 150 with the random default model)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=_cmd_demo)

    s = sub.add_parser("bench", help="run bench/run.py (from a source clone); its options follow, e.g. --quick")
    s.set_defaults(fn=_cmd_bench, rest=[])
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after `bench` belongs to bench/run.py (argparse's REMAINDER refuses a first "-" argument).
    if argv[:1] == ["bench"] and not {"-h", "--help"} & set(argv[1:2]):
        args = parser.parse_args(["bench"])
        args.rest = argv[1:]
        return args
    return parser.parse_args(argv)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread like Ctrl-C so that every `finally` and
    `except BaseException` on the way out removes the temporary files it made."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


# Commands that write files: a SIGTERM or SIGHUP ends them through their cleanup (exit 128 + the signal).
CLEANUP_ON_SIGNAL = ("say", "export", "quantize", "share-weights", "verify")


def _signals_raise():
    """Install SIGTERM/SIGHUP handlers that raise Terminated once (a second signal during the cleanup is
    ignored, so the cleanup finishes); returns a function that restores the previous handlers."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    fired = []

    def handler(signum, _frame):
        if fired:
            return
        fired.append(signum)
        raise Terminated(signum)

    wanted = [getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n)]
    old = {s: signal.signal(s, handler) for s in wanted}

    def restore():
        for s, h in old.items():
            signal.signal(s, h)
    return restore


def _error_line(cmd: str, e: BaseException) -> str:
    import errno

    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        what = e.filename or "the output"
        return f"chattts-ort {cmd}: error: no space left on device while writing {what}; nothing was replaced"
    return f"chattts-ort {cmd}: error: {e}"


def main(argv=None) -> int:
    args = parse_args(argv)
    restore = _signals_raise() if args.cmd in CLEANUP_ON_SIGNAL else (lambda: None)
    try:
        return args.fn(args) or 0
    except Terminated as e:
        import signal

        name = signal.Signals(e.signum).name
        print(f"chattts-ort {args.cmd}: stopped by {name}; temporary files removed", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, TypeError, RuntimeError) as e:
        print(_error_line(args.cmd, e), file=sys.stderr)
        return 2
    finally:
        restore()


if __name__ == "__main__":
    sys.exit(main())
