//! Learning-rate schedule: linear warm-up, then cosine decay to zero (the paper's setup).

pub fn cosine_with_warmup(step: usize, total: usize, warmup_ratio: f64, peak: f64) -> f64 {
    let warmup = ((total as f64) * warmup_ratio).ceil() as usize;
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = (total - warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

#[cfg(test)]
mod tests {
    use super::cosine_with_warmup as lr;

    #[test]
    fn warms_up_then_decays() {
        assert!((lr(0, 100, 0.03, 1.0) - 1.0 / 3.0).abs() < 1e-12);
        assert!((lr(2, 100, 0.03, 1.0) - 1.0).abs() < 1e-12);
        assert!((lr(3, 100, 0.03, 1.0) - 1.0).abs() < 1e-12);
        assert!(lr(50, 100, 0.03, 1.0) < 0.6 && lr(50, 100, 0.03, 1.0) > 0.4);
        assert!(lr(99, 100, 0.03, 1.0) < 0.01);
        assert_eq!(lr(5, 10, 0.0, 2.0), lr(5, 10, 0.0, 2.0));
    }
}
