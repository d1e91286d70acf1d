//! The CPU features the kernels may use, detected once per process. Each set names exactly the
//! features that the code it guards is compiled for (`#[target_feature(enable = ...)]`).

use std::sync::OnceLock;

#[derive(Debug, Clone, Copy, Default)]
pub struct CpuFeatures {
    /// `avx512f,avx512bw,avx512vl,fma`: the element-wise and attention kernels' wide build.
    pub avx512_fma: bool,
    /// `avx512f,avx512bw,avx512vnni`: the Q8_0 products.
    pub avx512_vnni: bool,
    /// `avx512f,avx512bw`: the AMX packing (AMX itself is detected in [`super::amx`]).
    pub avx512_bw: bool,
}

pub fn cpu() -> &'static CpuFeatures {
    static FEATURES: OnceLock<CpuFeatures> = OnceLock::new();
    FEATURES.get_or_init(detect)
}

#[cfg(target_arch = "x86_64")]
fn detect() -> CpuFeatures {
    use std::arch::is_x86_feature_detected as has;
    let avx512_bw = has!("avx512f") && has!("avx512bw");
    CpuFeatures { avx512_fma: avx512_bw && has!("avx512vl") && has!("fma"), avx512_vnni: avx512_bw && has!("avx512vnni"), avx512_bw }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> CpuFeatures {
    CpuFeatures::default()
}
