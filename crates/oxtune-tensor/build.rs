//! With the `cuda` feature, compiles `kernels/*.cu` to PTX in OUT_DIR with nvcc (found on
//! PATH, or as $CUDA_ROOT/bin/nvcc or $NVCC), for `sm_$CUDA_COMPUTE_CAP` (default 90: H100/H200).
//! `src/cuda/mod.rs` embeds the PTX with `include_str!` and candle's CUDA device loads it on
//! first use. Without the feature this does nothing, so CPU builds need no CUDA toolkit.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The kernel files, one PTX module each (`src/cuda/mod.rs` names the same list).
const KERNELS: [&str; 12] = [
    "softmax",
    "rms_norm",
    "swiglu",
    "rope",
    "adamw",
    "cross_entropy",
    "add_rms_norm",
    "flash_attn",
    "paged_attn",
    "rope_cache",
    "gemv",
    "embedding",
];

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=kernels");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo::rerun-if-env-changed=NVCC");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let compute_cap = env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".to_owned());
    let compute_cap = compute_cap.trim().trim_start_matches("sm_").to_owned();
    let nvcc = nvcc();
    for kernel in KERNELS {
        let source = Path::new("kernels").join(format!("{kernel}.cu"));
        let ptx = out_dir.join(format!("{kernel}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17", "--expt-relaxed-constexpr"])
            .arg(format!("-arch=sm_{compute_cap}"))
            .arg("-Ikernels")
            .arg(&source)
            .arg("-o")
            .arg(&ptx)
            .status()
            .unwrap_or_else(|error| {
                panic!(
                    "could not run {} for {}: {error}\nhint: put nvcc on PATH or set NVCC \
                     (scripts/build-cuda.sh does)",
                    nvcc.display(),
                    source.display()
                )
            });
        assert!(
            status.success(),
            "nvcc failed on {} ({status})",
            source.display()
        );
    }
}

fn nvcc() -> PathBuf {
    if let Some(nvcc) = env::var_os("NVCC") {
        return PathBuf::from(nvcc);
    }
    for root in ["CUDA_ROOT", "CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = env::var_os(root) {
            let candidate = Path::new(&root).join("bin").join("nvcc");
            if candidate.exists() {
                return candidate;
            }
        }
    }
    PathBuf::from("nvcc")
}
