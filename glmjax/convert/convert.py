"""glmjax-convert: a Hugging Face GLM-4.x checkpoint -> a glmjax checkpoint (Orbax).

    glmjax-convert --hf_dir /models/GLM-4.6 --out /ckpt/glm46 [--dtype bf16|fp32]
                   [--resume | --overwrite] [--workers 4]

In order:
1. config.json and every safetensors header are read, and every tensor name and shape is
   checked against the model's abstract tree (`glmjax.hf.plan`). Any problem stops the run
   here, before anything is written, naming the files and tensors at fault.
2. One item at a time ('model', each layer, 'mtp'; see glmjax/checkpoint.py) the tensors are
   read, per-expert tensors stacked into [E, ...], quantized weights dequantized in fp32,
   everything cast to --dtype (the router stays fp32). The item is saved with Orbax into
   params/<item>.partial, read back and checked against the checksums of what was meant to
   be written, then renamed to params/<item>. Memory: about one layer, whatever the model.
3. The config, tokenizer and template files are copied; last, the manifest goes to
   COMPLETE.tmp and is renamed to COMPLETE. Without COMPLETE, load_checkpoint refuses it.

Interrupted at any point (kill -9 included) and rerun with --resume, it keeps the finished
items, deletes partial ones and does the rest; the result is the same as an uninterrupted
run. glmjax_convert.json holds the run's settings (source files with sizes and mtimes,
config.json hash, dtype); --resume refuses to mix a different source or dtype in.

FP8 (E4M3/E5M2) and int8 weights with scales are dequantized to --dtype; keeping them
quantized in the output is not implemented.

For the crash tests, GLMJAX_CONVERT_KILL=<point>:<item index> makes the converter SIGKILL
itself at that point (see `_kill_point`).
"""

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags, logging

from glmjax.checkpoint import (
    COMPLETE,
    FORMAT,
    ITEM_RECORD,
    PARAMS,
    SETTINGS,
    array_key,
    crc32,
    item_of,
    manifest_digest,
    param_path,
    read_manifest,
)
from glmjax.config import ConfigError, GlmConfig
from glmjax.hf import (
    QUANTIZED,
    CheckpointError,
    SafetensorsDir,
    _flatten,
    _unflatten,
    checkpoint_has_mtp,
    mtp_ignored_names,
    plan,
    quant_scale,
    read_param,
    source_names,
)
from glmjax.model import abstract_params, param_axes

DTYPES = {'bf16': jnp.bfloat16, 'fp32': jnp.float32}
# Copied next to the weights when the source has them; config.json is always written.
SIDE_FILES = ('generation_config.json', 'tokenizer.json', 'tokenizer_config.json',
              'tokenizer.model', 'special_tokens_map.json', 'chat_template.jinja')
# Orbax chunk size: a sharded restore reads whole chunks, so chunks much smaller than a
# shard keep each host's reads to about its own shards. Expert stacks are cut one expert
# per chunk (Orbax's `shard_axes`), matching expert parallelism.
CHUNK_BYTES = 64 << 20


class ConvertError(Exception):
    """A problem with the output directory or the flags; the message says what to do."""


@dataclasses.dataclass
class Job:
    """Everything decided (and checked) before the first byte is written."""
    hf_dir: str
    cfg: GlmConfig
    ckpt: SafetensorsDir
    mtp: bool
    items: dict[str, dict[tuple, tuple]]  # item -> path in item -> (how, what) of hf.plan
    targets: dict[tuple, jax.ShapeDtypeStruct]  # param path -> stored shape and dtype
    item_bytes: dict[str, int]  # source bytes each item reads
    settings: dict  # what must match for --resume


def prepare(hf_dir: str, dtype: str) -> Job:
    """Reads config and headers and checks every tensor; raises before writing anything."""
    if dtype not in DTYPES:
        raise ConvertError(f'--dtype {dtype}: keeping weights quantized is not implemented; '
                           'FP8 and int8 inputs are dequantized to --dtype bf16 or fp32')
    cfg = GlmConfig.from_hf(hf_dir)
    ckpt = SafetensorsDir(hf_dir)
    mtp = checkpoint_has_mtp(cfg, ckpt)
    items: dict[str, dict] = {}
    for path, entry in plan(cfg, ckpt, mtp).items():
        item, sub = item_of(path)
        items.setdefault(item, {})[sub] = entry
    item_bytes = {item: sum(_source_bytes(ckpt, *entry) for entry in entries.values())
                  for item, entries in items.items()}
    settings = {'format': FORMAT, 'dtype': str(jnp.dtype(DTYPES[dtype])), 'mtp': mtp,
                'items': list(items), 'source': _fingerprint(hf_dir, ckpt)}
    targets = _flatten(abstract_params(cfg, DTYPES[dtype], mtp=mtp))
    return Job(os.path.abspath(hf_dir), cfg, ckpt, mtp, items, targets, item_bytes, settings)


def _source_bytes(ckpt: SafetensorsDir, how: str, what) -> int:
    total = 0
    for name in source_names(how, what):
        total += ckpt.nbytes(name)
        if ckpt.dtypes[name] in QUANTIZED:
            total += ckpt.nbytes(quant_scale(ckpt, name)[0])
    return total


def _fingerprint(hf_dir: str, ckpt: SafetensorsDir) -> dict:
    """What identifies the source for --resume: config.json and each file's size and mtime."""
    with open(os.path.join(hf_dir, 'config.json'), 'rb') as f:
        config_sha = hashlib.sha256(f.read()).hexdigest()
    files = {}
    for file in sorted(set(ckpt.files.values())):
        st = os.stat(os.path.join(hf_dir, file))
        files[file] = [st.st_size, st.st_mtime_ns]
    return {'config_sha256': config_sha, 'files': files}


# --- the output directory ---------------------------------------------------------------

def _write_atomic(path: str, data: bytes | str) -> None:
    """Writes path.tmp, fsyncs it, renames it over path: readers see old or new, whole."""
    tmp = path + '.tmp'
    with open(tmp, 'wb') as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
    _fsync_dir(os.path.dirname(path))


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: str) -> None:
    """Flushes every file and directory under path, so a rename after it publishes data
    that is on disk."""
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), 'rb') as f:
                os.fsync(f.fileno())
        _fsync_dir(root)


def open_output(out: str, settings: dict, resume: bool, overwrite: bool) -> None:
    """Creates --out, or checks that the unfinished conversion in it is this one."""
    if resume and overwrite:
        raise ConvertError('--resume and --overwrite exclude each other')
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConvertError(f'--out {out} exists and is not a directory')
    ours = any(os.path.exists(os.path.join(out, f)) for f in (SETTINGS, COMPLETE))
    if os.path.isdir(out) and os.listdir(out):
        if overwrite:
            if not ours:
                raise ConvertError(f'refusing to delete {out}: it is not a glmjax checkpoint '
                                   f'(no {SETTINGS}); remove it yourself or pick another --out')
            shutil.rmtree(out)
        elif not resume:
            raise ConvertError(f'{out} already exists: pass --resume to finish an interrupted '
                               'conversion into it, or --overwrite to replace it')
        elif not ours:
            raise ConvertError(f'cannot resume into {out}: it is not a glmjax conversion '
                               f'(no {SETTINGS})')
        else:
            with open(os.path.join(out, SETTINGS)) as f:
                previous = json.load(f)
            changed = [f'{k} {previous.get(k)} (now {settings[k]})' if k != 'source' else
                       'source (safetensors files or config.json changed)'
                       for k in settings if previous.get(k) != settings[k]]
            if changed:
                raise ConvertError(f'cannot resume into {out}: it was started with a different '
                                   f'{"; ".join(changed)}; use --overwrite to start over')
            return
    os.makedirs(os.path.join(out, PARAMS), exist_ok=True)
    _write_atomic(os.path.join(out, SETTINGS), json.dumps(settings, indent=1))


def finished_items(out: str, job: Job) -> dict[str, dict]:
    """Records of the items a previous run finished; deletes everything else in params/
    (partial items, Orbax temporary directories) and stale temporary files."""
    params = os.path.join(out, PARAMS)
    done = {}
    for entry in sorted(os.listdir(params)):
        record = _read_record(os.path.join(params, entry))
        if entry in job.items and record is not None and _matches(job, entry, record):
            done[entry] = record
        else:
            shutil.rmtree(os.path.join(params, entry))
    for entry in os.listdir(out):
        if entry.endswith('.tmp'):
            os.remove(os.path.join(out, entry))
    return done


def _read_record(item_dir: str) -> dict | None:
    try:
        with open(os.path.join(item_dir, ITEM_RECORD)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _matches(job: Job, item: str, record: dict) -> bool:
    expected = {array_key(sub): job.targets[param_path(item, sub)] for sub in job.items[item]}
    return set(record) == set(expected) and all(
        tuple(record[k]['shape']) == a.shape and record[k]['dtype'] == str(a.dtype)
        for k, a in expected.items())


# --- one item ---------------------------------------------------------------------------

def _save_args(job: Job, item: str) -> dict:
    axes = _flatten(param_axes(job.cfg, mtp=job.mtp))
    args = {}
    for sub in job.items[item]:
        names = axes[param_path(item, sub)]
        stack = len(names) == 3 and names[0] == 'experts'
        args[sub] = ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES, shard_axes=(0,) if stack else ())
    return _unflatten(args)


def write_item(job: Job, out: str, index: int, item: str, workers: int,
               checkpointer: ocp.Checkpointer) -> dict:
    """Converts, saves, reads back and publishes one item; returns its record."""
    arrays = {}
    for sub, (how, what) in job.items[item].items():
        target = job.targets[param_path(item, sub)]
        arrays[sub] = read_param(job.ckpt, how, what, target.shape, target.dtype, workers)
    record = {array_key(sub): {'shape': list(a.shape), 'dtype': str(a.dtype), 'crc32': crc32(a)}
              for sub, a in arrays.items()}
    partial = os.path.join(out, PARAMS, item + '.partial')
    _kill_while_saving(out, item, index)
    checkpointer.save(partial, args=ocp.args.PyTreeSave(_unflatten(arrays),
                                                        save_args=_save_args(job, item)))
    _kill_point('saved', index)
    del arrays  # the read-back below needs the memory
    _verify(checkpointer, partial, record)
    _write_atomic(os.path.join(partial, ITEM_RECORD), json.dumps(record, indent=1))
    _fsync_tree(partial)
    _kill_point('recorded', index)
    os.rename(partial, os.path.join(out, PARAMS, item))
    _fsync_dir(os.path.join(out, PARAMS))
    _kill_point('done', index)
    return record


def _verify(checkpointer: ocp.Checkpointer, item_dir: str, record: dict) -> None:
    """Reads the item back: every array present with the shape, dtype and bytes meant."""
    restored = {array_key(sub): a for sub, a in
                _flatten(checkpointer.restore(item_dir, args=ocp.args.PyTreeRestore())).items()}
    for key, info in record.items():
        a = restored.get(key)
        got = None if a is None else (list(a.shape), str(a.dtype), crc32(a))
        if got != (info['shape'], info['dtype'], info['crc32']):
            raise ConvertError(f'{item_dir}: array {key} read back as {got}, but '
                               f'{info["shape"]} {info["dtype"]} crc32 {info["crc32"]} was '
                               'written: the disk or filesystem lost data')


# --- the end ----------------------------------------------------------------------------

def _quantization(job: Job) -> dict | None:
    """Which source tensors were quantized, and how they were stored."""
    dtypes: dict[str, int] = {}
    layouts: dict[str, int] = {}
    for entries in job.items.values():
        for how, what in entries.values():
            for name in source_names(how, what):
                if job.ckpt.dtypes[name] in QUANTIZED:
                    dtypes[job.ckpt.dtypes[name]] = dtypes.get(job.ckpt.dtypes[name], 0) + 1
                    layout = quant_scale(job.ckpt, name)[1]
                    layouts[layout] = layouts.get(layout, 0) + 1
    if not dtypes:
        return None
    return {'tensors_by_dtype': dtypes, 'scales_by_layout': layouts,
            'dequantized_to': job.settings['dtype'], 'block': list(job.ckpt.block)}


def _copy_side_files(job: Job, out: str, quantization: dict | None) -> list[str]:
    """config.json (its quantization_config dropped once the weights are dequantized) and
    the tokenizer, template and generation files the source has."""
    with open(os.path.join(job.hf_dir, 'config.json')) as f:
        config = json.load(f)
    if quantization is not None:
        quantization['source_quantization_config'] = config.pop('quantization_config', None)
    _write_atomic(os.path.join(out, 'config.json'), json.dumps(config, indent=2))
    copied = ['config.json']
    for name in SIDE_FILES:
        src = os.path.join(job.hf_dir, name)
        if os.path.exists(src):
            with open(src, 'rb') as f:
                _write_atomic(os.path.join(out, name), f.read())
            copied.append(name)
    return copied


def _mtp_record(job: Job) -> dict | None:
    if not job.mtp:
        return None
    L = job.cfg.num_hidden_layers
    return {'hf_layer': L,
            # GLM-4.6 omits the MTP layer's own embedding and head: the main ones serve.
            'reuses': {f'model.layers.{L}.embed_tokens': 'model.embed',
                       f'model.layers.{L}.shared_head.head': 'model.lm_head'},
            'ignored_source_tensors': [n for n in mtp_ignored_names(job.cfg)
                                       if n in job.ckpt.shapes]}


def finish(job: Job, out: str, records: dict[str, dict]) -> dict:
    """Copies the side files, then writes the manifest as COMPLETE: the last write."""
    missing = [item for item in job.items if item not in records]
    if missing:
        raise ConvertError(f'{out}: items {missing} were not written')
    quantization = _quantization(job)
    files = _copy_side_files(job, out, quantization)
    manifest = {
        'format': FORMAT, 'dtype': job.settings['dtype'], 'mtp': _mtp_record(job),
        'quantization': quantization, 'files': files,
        'source': {'hf_dir': job.hf_dir, **job.settings['source']},
        'items': {item: records[item] for item in job.items},
    }
    manifest['sha256'] = manifest_digest(manifest)
    _kill_point('before_complete', 0)
    _write_atomic(os.path.join(out, COMPLETE), json.dumps(manifest, indent=1))
    return manifest


# --- the whole run ----------------------------------------------------------------------

class Progress:
    """One line per item on stderr: bytes done, read rate, ETA."""

    def __init__(self, total: int, n_items: int, stream):
        self.total, self.n_items, self.stream = total, n_items, stream
        self.done = self.read = 0
        self.start = time.perf_counter()

    def item(self, index: int, item: str, nbytes: int, skipped: bool = False):
        self.done += nbytes
        self.read += 0 if skipped else nbytes
        elapsed = time.perf_counter() - self.start
        rate = self.read / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        note = ' (done before, kept)' if skipped else ''
        print(f'glmjax-convert: [{index + 1}/{self.n_items}] {item}{note}  '
              f'{_size(self.done)} of {_size(self.total)}  {_size(rate)}/s  '
              f'ETA {time.strftime("%H:%M:%S", time.gmtime(eta))}',
              file=self.stream, flush=True)


def _size(n: float) -> str:
    for unit in ('B', 'KB', 'MB', 'GB'):
        if n < 1000:
            return f'{n:.1f} {unit}'
        n /= 1000
    return f'{n:.1f} TB'


def convert(hf_dir: str, out: str, dtype: str = 'bf16', resume: bool = False,
            overwrite: bool = False, workers: int = 4, stream=None) -> dict:
    """The whole conversion (see the module docstring). Progress goes to `stream` (default
    stderr). Returns the manifest."""
    stream = stream or sys.stderr
    out = os.path.abspath(out)  # Orbax wants absolute paths
    job = prepare(hf_dir, dtype)
    try:
        open_output(out, job.settings, resume, overwrite)
        if os.path.exists(os.path.join(out, COMPLETE)):
            print(f'glmjax-convert: {out} is already complete', file=stream)
            return read_manifest(out)
        _kill_point('started', 0)
        return _convert_items(job, out, workers, stream)
    finally:
        job.ckpt.close()


def _convert_items(job: Job, out: str, workers: int, stream) -> dict:
    start = time.perf_counter()
    records = finished_items(out, job)
    progress = Progress(sum(job.item_bytes.values()), len(job.items), stream)
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False))
    quant = _quantization(job)
    if quant:
        print(f'glmjax-convert: {sum(quant["tensors_by_dtype"].values())} quantized tensors '
              f'({quant["tensors_by_dtype"]}) are dequantized to {quant["dequantized_to"]}',
              file=stream)
    for index, item in enumerate(job.items):
        skipped = item in records
        if not skipped:
            records[item] = write_item(job, out, index, item, workers, checkpointer)
        progress.item(index, item, job.item_bytes[item], skipped)
    manifest = finish(job, out, records)
    elapsed = time.perf_counter() - start
    n_arrays = sum(len(r) for r in records.values())
    written = sum(np.dtype(a['dtype']).itemsize * int(np.prod(a['shape']))
                  for r in records.values() for a in r.values())
    n_source = sum(len(source_names(how, what)) for entries in job.items.values()
                   for how, what in entries.values())
    print(f'glmjax-convert: done: {n_arrays} arrays from {n_source} source tensors, '
          f'{_size(progress.read)} read, {_size(written)} written, {elapsed:.1f} s '
          f'({_size(progress.read / max(elapsed, 1e-9))}/s) -> {out}', file=stream, flush=True)
    return manifest


# --- crash-test hooks -------------------------------------------------------------------

def _kill_point(point: str, index: int) -> None:
    """SIGKILLs this process when GLMJAX_CONVERT_KILL is '<point>:<index>'. Points: started,
    saving (during the Orbax save of item index), saved (saved, not yet read back),
    recorded (checked, not yet renamed), done (renamed), before_complete (no COMPLETE)."""
    if os.environ.get('GLMJAX_CONVERT_KILL') == f'{point}:{index}':
        os.kill(os.getpid(), signal.SIGKILL)


def _kill_while_saving(out: str, item: str, index: int) -> None:
    """For 'saving:<index>': a thread kills the process as soon as Orbax has written a file
    of the item (falls back to the 'saved' point if the save is too quick to catch)."""
    if os.environ.get('GLMJAX_CONVERT_KILL') != f'saving:{index}':
        return
    os.environ['GLMJAX_CONVERT_KILL'] = f'saved:{index}'
    params = os.path.join(out, PARAMS)

    def watch():
        while True:
            for entry in os.listdir(params):
                if entry.startswith(item + '.partial') and any(
                        files for _, _, files in os.walk(os.path.join(params, entry))):
                    os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.0005)

    threading.Thread(target=watch, daemon=True).start()


# --- command line -----------------------------------------------------------------------

def _define_flags():
    """Defined when the CLI runs, not on import: glmjax-verify has flags of the same names."""
    flags.DEFINE_string('hf_dir', None, 'Hugging Face checkpoint directory (config.json, '
                        'safetensors files, tokenizer files)')
    flags.DEFINE_string('out', None, 'output directory for the glmjax checkpoint')
    flags.DEFINE_enum('dtype', 'bf16', ['bf16', 'fp32', 'fp8', 'int8'],
                      'dtype of the stored weights (the router stays fp32). FP8 and int8 inputs '
                      'are dequantized to it; fp8/int8 output is not implemented')
    flags.DEFINE_bool('resume', False, 'finish an interrupted conversion into --out')
    flags.DEFINE_bool('overwrite', False, 'delete an existing glmjax checkpoint at --out and '
                      'convert from scratch')
    flags.DEFINE_integer('workers', min(8, os.cpu_count() or 1),
                         'threads reading the per-expert tensors of a layer')
    flags.mark_flags_as_required(['hf_dir', 'out'])


def main(argv) -> int:
    if len(argv) > 1:
        print(f'glmjax-convert: error: unexpected arguments {argv[1:]}', file=sys.stderr)
        return 2
    f = flags.FLAGS
    if not f['verbosity'].present:  # Orbax logs every step at INFO
        logging.set_verbosity(logging.WARNING)
    try:
        convert(f.hf_dir, f.out, f.dtype, f.resume, f.overwrite, f.workers)
    except (ConvertError, CheckpointError, ConfigError, OSError) as e:
        print(f'glmjax-convert: error: {e}', file=sys.stderr)
        return 1
    return 0


def run():
    _define_flags()
    app.run(main)


if __name__ == '__main__':
    run()
