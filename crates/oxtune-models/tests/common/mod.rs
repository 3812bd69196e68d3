//! What the fixture-based integration tests share: where the fixtures are and which device
//! and dtype to run on.

use std::path::{Path, PathBuf};

use oxtune_tensor::{DType, Device};

/// The device and dtype under test: CPU f32 unless `OXTUNE_TEST_DEVICE` (e.g. `cuda`) and
/// `OXTUNE_TEST_DTYPE` (e.g. `bfloat16`) say otherwise.
pub fn target() -> anyhow::Result<(Device, DType)> {
    let device = oxtune_tensor::parse_device(
        &std::env::var("OXTUNE_TEST_DEVICE").unwrap_or_else(|_| "cpu".into()),
    )?;
    let dtype = oxtune_tensor::parse_dtype(
        &std::env::var("OXTUNE_TEST_DTYPE").unwrap_or_else(|_| "float32".into()),
    )?;
    Ok((device, dtype))
}

/// `tests/fixtures/NAME`, or under `$OXTUNE_FIXTURES` when the test binary runs elsewhere.
pub fn fixture(name: &str) -> PathBuf {
    std::env::var_os("OXTUNE_FIXTURES")
        .map_or_else(
            || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures"),
            PathBuf::from,
        )
        .join(name)
}
