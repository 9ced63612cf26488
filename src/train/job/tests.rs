use super::*;

#[test]
fn init_parses_its_three_forms_and_names_bad_ones() {
    assert_eq!(TagInit::parse("mean").unwrap(), TagInit::Mean);
    assert_eq!(
        TagInit::parse("text:Translate into").unwrap(),
        TagInit::Text("Translate into".into())
    );
    assert_eq!(
        TagInit::parse("tag:QED").unwrap(),
        TagInit::Tag("QED".into())
    );
    for bad in ["", "text:", "tag:..", "random", "tag:a b"] {
        let e = TagInit::parse(bad).unwrap_err().to_string();
        assert!(e.contains("init must be"), "{bad:?}: {e}");
    }
}

#[test]
fn absurd_hyperparameters_are_refused_by_name() {
    let ok = Hyperparameters::default();
    ok.validate().unwrap();
    let cases: Vec<(Hyperparameters, &str)> = vec![
        (
            Hyperparameters {
                batch_size: 1 << 40,
                ..ok.clone()
            },
            "batch_size",
        ),
        (
            Hyperparameters {
                steps: 1_000_000_000_000,
                ..ok.clone()
            },
            "steps",
        ),
        (
            Hyperparameters {
                grad_accum: 1 << 62,
                ..ok.clone()
            },
            "grad_accum",
        ),
        // Found by an outside probe, accepted (202) before.
        (
            Hyperparameters {
                eval_every: usize::MAX,
                ..ok.clone()
            },
            "eval_every",
        ),
        (
            Hyperparameters {
                init: format!("text:{}", "x".repeat(100_000)),
                ..ok.clone()
            },
            "init must be at most",
        ),
        (
            Hyperparameters {
                learning_rate: 1e308,
                ..ok.clone()
            },
            "learning_rate",
        ),
        (
            Hyperparameters {
                head_learning_rate: Some(-1.0),
                ..ok.clone()
            },
            "head_learning_rate",
        ),
        (
            Hyperparameters {
                epochs: f64::NAN,
                ..ok.clone()
            },
            "epochs",
        ),
        (
            Hyperparameters {
                epochs: -1.0,
                ..ok.clone()
            },
            "epochs",
        ),
        (
            Hyperparameters {
                head_positions: 11,
                ..ok.clone()
            },
            "head_positions",
        ),
        (
            Hyperparameters {
                head_positions: 0,
                ..ok.clone()
            },
            "head_positions",
        ),
    ];
    for (h, field) in cases {
        let e = h.validate().unwrap_err().to_string();
        assert!(e.contains(field), "{field}: {e}");
    }
}

#[test]
fn epochs_set_the_number_of_steps() {
    let h = Hyperparameters {
        epochs: 2.0,
        batch_size: 8,
        grad_accum: 2,
        ..Default::default()
    };
    assert_eq!(h.total_steps(100), 13); // 200 draws / 16 per step, rounded up
    assert_eq!(Hyperparameters::default().total_steps(100), 1000);
}
