//! The packed (block-quantized) matmul alone: GB/s of weights read and GFLOP/s, for a matrix
//! that fits in cache and one that does not, at 1 to 8 activation rows. With `prefill`: the
//! tiled product ([`PackedMatrix::matmul_tiled`]) of one layer of the default model's shapes at
//! 17 to 2,048 activation rows against candle's f32 matmul over the whole dequantized matrices
//! (what the prefill path held before), alternated twice.
//!
//! Usage: bench_packed [q4_0|q4_1|q8_0] [prefill]

use std::time::Instant;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use tidelock_worker::model::packed::PackedMatrix;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dtype = match std::env::args().nth(1).as_deref() {
        None | Some("q4_1") => GgmlDType::Q4_1,
        Some("q4_0") => GgmlDType::Q4_0,
        Some("q8_0") => GgmlDType::Q8_0,
        Some(other) => return Err(format!("unknown kind {other}").into()),
    };
    if std::env::args().nth(2).as_deref() == Some("prefill") {
        return prefill(dtype);
    }
    let cols = 576;
    for rows in [576, 49_152] {
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1000) as f32) / 500.0 - 1.0)
            .collect();
        let q = QTensor::quantize(
            &Tensor::from_vec(values, (rows, cols), &Device::Cpu)?,
            dtype,
        )?;
        let packed = PackedMatrix::from_qtensor(&q)?.ok_or("no packed kernel")?;
        let dense = q.dequantize(&Device::Cpu)?.t()?.contiguous()?;
        for m in [1, 4, 8] {
            let x: Vec<f32> = (0..m * cols).map(|i| (i % 17) as f32 / 17.0).collect();
            let reps = (2_000_000_000 / packed.bytes()).clamp(3, 20_000);
            let mut check = 0.0;
            let started = Instant::now();
            for _ in 0..reps {
                check += packed.matmul(&x, m)[0];
            }
            let s = started.elapsed().as_secs_f64();
            println!(
                "{dtype:?} {rows}x{cols} m={m}: {:.2} GB/s of weights, {:.1} GFLOP/s ({:.1} us per call) [{check:.1}]",
                (packed.bytes() * reps) as f64 / s / 1e9,
                (2 * rows * cols * m * reps) as f64 / s / 1e9,
                s * 1e6 / reps as f64
            );
            let xt = Tensor::from_vec(x.clone(), (m, cols), &Device::Cpu)?;
            let reps = reps.div_ceil(4);
            let started = Instant::now();
            for _ in 0..reps {
                check += xt.matmul(&dense)?.get(0)?.get(0)?.to_scalar::<f32>()?;
            }
            let s = started.elapsed().as_secs_f64();
            println!(
                "  f32 candle matmul, same shape: {:.2} GB/s of weights, {:.1} GFLOP/s ({:.1} us per call) [{check:.1}]",
                (rows * cols * 4 * reps) as f64 / s / 1e9,
                (2 * rows * cols * m * reps) as f64 / s / 1e9,
                s * 1e6 / reps as f64
            );
        }
    }
    Ok(())
}

/// A `[rows, cols]` matrix of `dtype` with made-up values: packed, and dequantized to f32
/// `[cols, rows]` (the layout candle's matmul multiplies).
fn matrix(
    dtype: GgmlDType,
    rows: usize,
    cols: usize,
) -> Result<(PackedMatrix, Tensor), Box<dyn std::error::Error>> {
    let values: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 7919 % 1000) as f32) / 500.0 - 1.0)
        .collect();
    let q = QTensor::quantize(
        &Tensor::from_vec(values, (rows, cols), &Device::Cpu)?,
        dtype,
    )?;
    let packed = PackedMatrix::from_qtensor(&q)?.ok_or("no packed kernel")?;
    Ok((packed, q.dequantize(&Device::Cpu)?.t()?.contiguous()?))
}

fn prefill(dtype: GgmlDType) -> Result<(), Box<dyn std::error::Error>> {
    // One layer of SmolLM2-135M: q/k/v fused, o, gate/up fused, down.
    let shapes = [(960, 576), (576, 576), (3072, 576), (576, 1536)];
    let mats = shapes
        .iter()
        .map(|&(rows, cols)| matrix(dtype, rows, cols))
        .collect::<Result<Vec<_>, _>>()?;
    for m in [2048, 512, 64, 17] {
        let flops = shapes.iter().map(|&(r, c)| 2 * r * c * m).sum::<usize>() as f64;
        let xs: Vec<Vec<f32>> = shapes
            .iter()
            .map(|&(_, cols)| {
                (0..m * cols)
                    .map(|i| (i % 17) as f32 / 17.0 - 0.5)
                    .collect()
            })
            .collect();
        let xts = xs
            .iter()
            .zip(&shapes)
            .map(|(x, &(_, cols))| Tensor::from_vec(x.clone(), (m, cols), &Device::Cpu))
            .collect::<Result<Vec<_>, _>>()?;
        let reps = (8192 / m).clamp(2, 200);
        for _ in 0..2 {
            let mut check = 0.0;
            let started = Instant::now();
            for _ in 0..reps {
                for ((packed, _), x) in mats.iter().zip(&xs) {
                    check += packed.matmul_tiled(x, m)[0];
                }
            }
            let tiled = started.elapsed().as_secs_f64() / reps as f64;
            let started = Instant::now();
            for _ in 0..reps {
                for ((_, dense), xt) in mats.iter().zip(&xts) {
                    check += xt.matmul(dense)?.get(0)?.get(0)?.to_scalar::<f32>()?;
                }
            }
            let dense = started.elapsed().as_secs_f64() / reps as f64;
            println!(
                "{dtype:?} layer, m={m}: tiled {:.2} ms ({:.1} GFLOP/s), f32 candle matmul {:.2} ms ({:.1} GFLOP/s), ratio {:.2} [{check:.1}]",
                tiled * 1e3,
                flops / tiled / 1e9,
                dense * 1e3,
                flops / dense / 1e9,
                dense / tiled
            );
        }
    }
    Ok(())
}
