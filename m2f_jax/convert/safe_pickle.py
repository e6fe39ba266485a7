"""Pickled checkpoints read without running their code: numpy arrays, torch tensors, plain containers.

Three containers, none of them needing torch (tensors come back as numpy arrays):
  - a plain pickle (detectron2's `R-50.pkl`: numpy arrays; the authors' Swin `.pkl`: torch tensors
    pickled as-is, each storage nested as a legacy `torch.save` byte string);
  - a legacy `torch.save` file (magic number, protocol, system info, pickle, raw storages);
  - a `torch.save` zip file (`<root>/data.pkl` + `<root>/data/<key>` raw storages).
The unpicklers resolve only the globals listed here; any other global (os.system, builtins.eval, a
model class) raises `pickle.UnpicklingError` before anything it names is called. Tensors are
rebuilt from (storage, offset, size, stride) after checking that they stay inside their storage.
"""
import codecs
import collections
import io
import pickle
import struct
import zipfile
from typing import Any, BinaryIO, Dict

import ml_dtypes
import numpy as np

_NUMPY_CORE = np._core.multiarray  # pylint: disable=protected-access
# (module, name) -> the only callables a numpy-array pickle may reference.
NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _NUMPY_CORE._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _NUMPY_CORE._reconstruct,
    ("numpy.core.multiarray", "scalar"): _NUMPY_CORE.scalar,
    ("numpy._core.multiarray", "scalar"): _NUMPY_CORE.scalar,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("collections", "OrderedDict"): collections.OrderedDict,
}

# torch storage class name -> element dtype
STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}

LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
LEGACY_PROTOCOL = 1001


class RefusedGlobal(pickle.UnpicklingError):
  """The pickle asks for a callable that is not on the allowed list."""


class ArraysOnlyUnpickler(pickle.Unpickler):
  """Unpickler that refuses every global except numpy array reconstruction and OrderedDict.

  `what` names the file kind in the refusal message.
  """

  def __init__(self, file: BinaryIO, what: str = "a checkpoint", **kwargs):
    super().__init__(file, encoding="latin1", **kwargs)
    self._what = what

  def allowed_global(self, module: str, name: str) -> Any:
    return NUMPY_GLOBALS.get((module, name))

  def find_class(self, module: str, name: str) -> Any:
    allowed = self.allowed_global(module, name)
    if allowed is None:
      raise RefusedGlobal(
          f"refusing to load {module}.{name} from the checkpoint: {self._what} holds only arrays "
          "and plain containers, and anything else could run code")
    return allowed


class _Storage:
  """A torch storage as a flat numpy array [numel] (filled later for legacy files)."""

  def __init__(self, dtype: Any, numel: int):
    self.array = np.zeros(int(numel), dtype)


class _StorageType:
  """Stands for a torch.<X>Storage class named in a pickle."""

  def __init__(self, name: str):
    self.dtype = STORAGE_DTYPES[name]


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_) -> np.ndarray:
  """torch._utils._rebuild_tensor(_v2): a strided view of `storage`, bounds-checked, copied."""
  if not isinstance(storage, _Storage):
    raise pickle.UnpicklingError(f"tensor rebuilt from {type(storage).__name__}, not a storage")
  shape, strides = tuple(size), tuple(stride)
  if not all(isinstance(v, int) and v >= 0 for v in (offset, *shape, *strides)) or len(shape) != len(strides):
    raise pickle.UnpicklingError(f"bad tensor layout: offset {offset}, size {shape}, stride {strides}")
  flat = storage.array
  if 0 in shape:
    return np.zeros(shape, flat.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(shape, strides))
  if last >= flat.size:
    raise pickle.UnpicklingError(f"tensor of size {shape} at offset {offset} overruns its storage "
                                 f"of {flat.size} elements")
  return np.lib.stride_tricks.as_strided(flat[offset:], shape, [s * flat.itemsize for s in strides],
                                         writeable=False)


def _rebuild_parameter(data: Any, *_) -> np.ndarray:
  if not isinstance(data, np.ndarray):
    raise pickle.UnpicklingError(f"parameter rebuilt from {type(data).__name__}, not a tensor")
  return data


def _latin1_encode(text: Any, encoding: str = "utf-8") -> bytes:
  """_codecs.encode as protocol-2 pickles use it for bytes: str -> latin-1 bytes only."""
  if not isinstance(text, str) or codecs.lookup(encoding).name != "iso8859-1":
    raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
  return text.encode("latin1")


def _storage_from_bytes(data: Any) -> "_Storage":
  """torch.storage._load_from_bytes: a storage saved alone in the legacy torch.save format."""
  if not isinstance(data, bytes):
    raise pickle.UnpicklingError("torch.storage._load_from_bytes given a non-bytes argument")
  storage = read_legacy_torch(io.BytesIO(data))
  if not isinstance(storage, _Storage):
    raise pickle.UnpicklingError("a nested torch.save byte string holds something other than a storage")
  return storage


_TORCH_GLOBALS = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("_codecs", "encode"): _latin1_encode,
}


class TensorUnpickler(ArraysOnlyUnpickler):
  """ArraysOnlyUnpickler that also rebuilds torch tensors (as numpy arrays) from storages.

  `storage_loader(storage_type, key, numel)` returns the `_Storage` of a persistent id
  ('storage', type, key, location, numel[, view]); None refuses persistent ids.
  """

  def __init__(self, file: BinaryIO, what: str = "a checkpoint", storage_loader=None):
    super().__init__(file, what)
    self._storage_loader = storage_loader

  def allowed_global(self, module: str, name: str) -> Any:
    if module == "torch" and name in STORAGE_DTYPES:
      return _StorageType(name)
    return _TORCH_GLOBALS.get((module, name)) or super().allowed_global(module, name)

  def persistent_load(self, pid: Any) -> Any:
    if (self._storage_loader is None or not isinstance(pid, tuple) or len(pid) < 5
        or pid[0] != "storage" or not isinstance(pid[1], _StorageType)):
      raise pickle.UnpicklingError(f"refusing persistent id {str(pid)[:80]}: only tensor storages "
                                   "may be referenced")
    if len(pid) > 5 and pid[5] is not None:
      raise pickle.UnpicklingError("storage views of legacy torch files are not supported")
    return self._storage_loader(pid[1], str(pid[2]), int(pid[4]))


def read_legacy_torch(f: BinaryIO) -> Any:
  """The object of a legacy (pre-zip) `torch.save` stream, tensors as numpy arrays."""
  if TensorUnpickler(f).load() != LEGACY_MAGIC:
    raise pickle.UnpicklingError("not a legacy torch.save stream (magic number differs)")
  if TensorUnpickler(f).load() != LEGACY_PROTOCOL:
    raise pickle.UnpicklingError("unsupported legacy torch.save protocol")
  system = TensorUnpickler(f).load()
  if not isinstance(system, dict) or not system.get("little_endian", True):
    raise pickle.UnpicklingError("big-endian legacy torch files are not supported")
  storages: Dict[str, _Storage] = {}

  def storage(storage_type: _StorageType, key: str, numel: int) -> _Storage:
    if key not in storages:
      storages[key] = _Storage(storage_type.dtype, numel)
    return storages[key]

  result = TensorUnpickler(f, "a torch file", storage).load()
  for key in TensorUnpickler(f).load():
    target = storages.get(key)
    if target is None:
      raise pickle.UnpicklingError(f"legacy torch file stores data for an unknown storage {key!r}")
    (numel,) = struct.unpack("<q", f.read(8))
    data = f.read(numel * target.array.itemsize)
    if numel != target.array.size or len(data) != target.array.nbytes:
      raise pickle.UnpicklingError(f"storage {key!r} holds {numel} elements, expected {target.array.size}")
    target.array[:] = np.frombuffer(data, target.array.dtype)
  return result


def read_torch_zip(path: str) -> Any:
  """The object of a `torch.save` zip file, tensors as numpy arrays."""
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pickles) != 1:
      raise pickle.UnpicklingError(f"a torch zip file holds one data.pkl, found {len(pickles)}")
    root = pickles[0][:-len("data.pkl")]
    byteorder = root + "byteorder"
    if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
      raise pickle.UnpicklingError("big-endian torch files are not supported")

    def storage(storage_type: _StorageType, key: str, numel: int) -> _Storage:
      data = archive.read(f"{root}data/{key}")
      loaded = _Storage(storage_type.dtype, 0)
      loaded.array = np.frombuffer(data, storage_type.dtype)
      if loaded.array.size != numel:
        raise pickle.UnpicklingError(f"storage {key!r} holds {loaded.array.size} elements, "
                                     f"expected {numel}")
      return loaded

    with archive.open(pickles[0]) as f:
      return TensorUnpickler(f, "a torch file", storage).load()


def read_pickle(path: str, what: str = "a checkpoint") -> Any:
  """The object of a plain pickle or a legacy torch.save file, tensors as numpy arrays."""
  with open(path, "rb") as f:
    first = TensorUnpickler(f, what).load()
    if first != LEGACY_MAGIC:
      return first
    f.seek(0)
    return read_legacy_torch(f)


def load_checkpoint_object(path: str, what: str = "a checkpoint") -> Any:
  """The object stored in `path` (torch zip, legacy torch.save or plain pickle), read safely.

  Raises:
    ValueError: a refused global (the file would run code), or a corrupt file.
  """
  try:
    if zipfile.is_zipfile(path):
      return read_torch_zip(path)
    return read_pickle(path, what)
  except pickle.UnpicklingError as e:
    raise ValueError(f"{path} is not a safe checkpoint: {e}") from e
  except Exception as e:  # truncated or corrupt files raise many kinds of errors
    raise ValueError(f"{path} could not be read as a pickle or torch file: {e!r}") from e

