//! Reading a checkpoint's tensors straight from memory-mapped safetensors files.
//!
//! Every tensor is read once: converted (or quantized) from the mapped bytes, after which the
//! mapped pages are handed back to the kernel. Mapped pages that stay resident count in the
//! process's RSS, so without that a 4 GiB checkpoint would add 4 GiB to the peak on top of the
//! weights we keep.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use memmap2::{Mmap, UncheckedAdvice};
use safetensors::tensor::{Dtype as StDtype, TensorInfo};

use crate::layers::quant::Quant;
use crate::loading::quant_cache::QuantCache;

struct Entry {
    file: usize,
    /// Byte range inside the mapping.
    start: usize,
    end: usize,
    dtype: DType,
    shape: Vec<usize>,
}

/// The tensors of one checkpoint (one or more shards), mapped but not read.
pub struct MappedWeights {
    maps: Vec<Mmap>,
    entries: HashMap<String, Entry>,
}

impl MappedWeights {
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut maps = Vec::with_capacity(paths.len());
        let mut entries = HashMap::new();
        for (file, path) in paths.iter().enumerate() {
            let map = map_file(path)?;
            let (header_len, metadata) =
                safetensors::SafeTensors::read_metadata(&map).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
            let data_start = 8 + header_len;
            for (name, info) in metadata.tensors() {
                let TensorInfo { dtype, shape, data_offsets: (start, end) } = info;
                let Some(dtype) = candle_dtype(*dtype) else { continue };
                entries.insert(name, Entry { file, start: data_start + start, end: data_start + end, dtype, shape: shape.clone() });
            }
            maps.push(map);
        }
        Ok(Self { maps, entries })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.entries.get(name).ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.to_string() }.bt())
    }

    /// The tensor's shape and dtype as stored.
    pub fn stored(&self, name: &str) -> Result<(DType, &[usize])> {
        let e = self.entry(name)?;
        Ok((e.dtype, &e.shape))
    }

    /// Runs `read` over the tensor's raw bytes, then releases the mapped pages.
    pub fn with_bytes<T>(&self, name: &str, read: impl FnOnce(&[u8], DType, &[usize]) -> Result<T>) -> Result<T> {
        let e = self.entry(name)?;
        let map = &self.maps[e.file];
        let out = read(&map[e.start..e.end], e.dtype, &e.shape);
        // SAFETY: the mapping is private and read-only; DONTNEED only drops pages that are read
        // again from the file on the next access, and no slice of this range outlives `read`.
        let _ = unsafe { map.unchecked_advise_range(UncheckedAdvice::DontNeed, e.start, e.end - e.start) };
        out
    }

    /// The tensor as stored, copied out of the mapping, on `device`.
    pub fn tensor(&self, name: &str, device: &Device) -> Result<Tensor> {
        self.with_bytes(name, |bytes, dtype, shape| Tensor::from_raw_buffer(bytes, dtype, shape, device))
    }
}

fn map_file(path: &Path) -> Result<Mmap> {
    let file = std::fs::File::open(path).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
    // SAFETY: the file is mapped read-only; like every safetensors loader we rely on nobody
    // truncating a checkpoint while it is being loaded.
    unsafe { Mmap::map(&file) }.map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))
}

fn candle_dtype(dtype: StDtype) -> Option<DType> {
    Some(match dtype {
        StDtype::F32 => DType::F32,
        StDtype::F16 => DType::F16,
        StDtype::BF16 => DType::BF16,
        StDtype::F64 => DType::F64,
        StDtype::I64 => DType::I64,
        StDtype::U32 => DType::U32,
        StDtype::U8 => DType::U8,
        _ => return None,
    })
}

/// Lets candle-nn's `VarBuilder` read from the same mapping.
struct Backend(Arc<MappedWeights>);

impl SimpleBackend for Backend {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let tensor = self.get_unchecked(name, dtype, dev)?;
        if tensor.shape() != &s {
            candle_core::bail!("shape mismatch for {name}: the checkpoint has {:?}, the config implies {:?}", tensor.shape(), s)
        }
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.0.tensor(name, &Device::Cpu)?.to_dtype(dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains(name)
    }
}

/// Where the model's modules load their tensors from: a `VarBuilder` for plain tensors, and
/// the mapped checkpoint itself for projections that are quantized on the way in.
#[derive(Clone)]
pub struct Loader<'a> {
    vb: VarBuilder<'a>,
    mapped: Arc<MappedWeights>,
    quant: Quant,
    cache: Option<Arc<QuantCache>>,
}

impl<'a> Loader<'a> {
    pub fn new(mapped: Arc<MappedWeights>, dtype: DType, device: &Device, quant: Quant, cache: Option<Arc<QuantCache>>) -> Self {
        let vb = VarBuilder::from_backend(Box::new(Backend(mapped.clone())), dtype, device.clone());
        Self { vb, mapped, quant, cache }
    }

    pub fn pp(&self, s: impl ToString) -> Self {
        Self { vb: self.vb.pp(s), mapped: self.mapped.clone(), quant: self.quant, cache: self.cache.clone() }
    }

    /// Where quantized weights are read from and recorded to, if anywhere.
    pub fn cache(&self) -> Option<&QuantCache> {
        self.cache.as_deref()
    }

    /// The full tensor path of `name` under this prefix.
    pub fn path(&self, name: &str) -> String {
        let prefix = self.vb.prefix();
        if prefix.is_empty() {
            name.to_string()
        } else {
            format!("{prefix}.{name}")
        }
    }

    pub fn prefix(&self) -> String {
        self.vb.prefix()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.vb.contains_tensor(name)
    }

    /// A tensor in the compute dtype, on the compute device.
    pub fn get(&self, shape: impl Into<Shape>, name: &str) -> Result<Tensor> {
        self.vb.get(shape, name)
    }

    /// A tensor in the dtype it is stored in (e.g. an embedding table kept in bf16).
    pub fn get_stored(&self, shape: impl Into<Shape>, name: &str) -> Result<Tensor> {
        let (dtype, _) = self.mapped.stored(&self.path(name))?;
        self.vb.get_with_hints_dtype(shape, name, Default::default(), dtype)
    }

    pub fn vb(&self) -> &VarBuilder<'a> {
        &self.vb
    }

    pub fn mapped(&self) -> &MappedWeights {
        &self.mapped
    }

    pub fn quant(&self) -> Quant {
        self.quant
    }

    pub fn dtype(&self) -> DType {
        self.vb.dtype()
    }

    pub fn device(&self) -> &Device {
        self.vb.device()
    }
}
