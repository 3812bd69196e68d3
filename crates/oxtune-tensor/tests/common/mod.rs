//! Helpers shared by the GPU test binaries.

use oxtune_tensor::{Device, Result};

/// Mean seconds of one call of `f` over 50 back-to-back calls after 5 warm-up calls, with the
/// device synchronised before and after (so queued kernels are counted, launches overlap).
pub fn seconds_per_call(device: &Device, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..5 {
        f()?;
    }
    device.synchronize()?;
    let calls = 50;
    let start = std::time::Instant::now();
    for _ in 0..calls {
        f()?;
    }
    device.synchronize()?;
    Ok(start.elapsed().as_secs_f64() / f64::from(calls))
}
