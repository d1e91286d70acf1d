//! The CPU features the kernels may use, detected once per process. Each set names exactly the
//! features that the code it guards is compiled for (`#[target_feature(enable = ...)]`).

use std::sync::OnceLock;

#[derive(Debug, Clone, Copy, Default)]
pub struct CpuFeatures {
    /// `avx512f,avx512bw,avx512vl,fma`: the element-wise and attention kernels' wide build.
    pub avx512_fma: bool,
    /// `avx512f,avx512bw,avx512vnni`: the Q8_0 products.
    pub avx512_vnni: bool,
    /// `avx512f,avx512bw,avx512bf16`: the AMX packing and softmax (AMX itself is detected in
    /// [`super::amx`]; every CPU with AMX-BF16 has AVX512-BF16).
    pub avx512_bf16: bool,
    /// `avx2,fma,f16c`: the middle tier, for x86 servers without AVX-512 (AMD before Zen 4,
    /// Intel before Skylake-SP): the element-wise kernels' 8-lane build and the Q8_0 products.
    pub avx2_fma: bool,
}

pub fn cpu() -> &'static CpuFeatures {
    static FEATURES: OnceLock<CpuFeatures> = OnceLock::new();
    FEATURES.get_or_init(detect)
}

/// The widest instruction sets the kernels may use, lowered by `QWEN_OCR_MAX_ISA` (`avx2`:
/// no AVX-512 or AMX; `baseline`: none of them) to measure or compare a faster path against
/// the one an older CPU would take, in the same build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ceiling {
    Baseline,
    Avx2,
    Any,
}

fn ceiling() -> Ceiling {
    match std::env::var("QWEN_OCR_MAX_ISA").as_deref() {
        Err(_) | Ok("" | "avx512" | "native") => Ceiling::Any,
        Ok("avx2") => Ceiling::Avx2,
        Ok("baseline" | "sse2") => Ceiling::Baseline,
        Ok(other) => {
            tracing::warn!("QWEN_OCR_MAX_ISA={other:?} is none of avx512, avx2, baseline: ignored");
            Ceiling::Any
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn detect() -> CpuFeatures {
    use std::arch::is_x86_feature_detected as has;
    let ceiling = ceiling();
    let avx512_bw = ceiling >= Ceiling::Any && has!("avx512f") && has!("avx512bw");
    CpuFeatures {
        avx512_fma: avx512_bw && has!("avx512vl") && has!("fma"),
        avx512_vnni: avx512_bw && has!("avx512vnni"),
        avx512_bf16: avx512_bw && has!("avx512bf16"),
        avx2_fma: ceiling >= Ceiling::Avx2 && has!("avx2") && has!("fma") && has!("f16c"),
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> CpuFeatures {
    CpuFeatures::default()
}
