//! CPU kernels apart from the model: the fused element-wise and attention kernels, the Q8_0
//! products (VNNI), the AMX tile products, the vision attention for AVX-512 without AMX, a
//! decode step's attention, the CPU features they need (detected once), and the process-wide
//! thread count.

pub mod amx;
pub(crate) mod decode_attention;
pub(crate) mod disjoint;
pub mod features;
pub mod fused;
pub mod q8;
pub mod span_attention;
pub mod threads;
