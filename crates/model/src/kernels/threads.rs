//! CPU thread count, fixed once per process.
//!
//! candle-core 0.11 asks for its thread count before every matmul. Unless `RAYON_NUM_THREADS`
//! is set, it recomputes the count each time, reading and parsing `/proc/cpuinfo`. On a small
//! model that costs a third of each decode step. Setting the variable once, to the count
//! candle computes anyway, keeps the same parallelism (so the same numbers) without the cost.

/// Call at process start, before any other thread exists: it sets an environment variable.
/// A count the user already set is left alone.
pub fn pin_cpu_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
}
