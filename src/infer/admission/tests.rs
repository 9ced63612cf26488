use super::*;

fn config(max_wait_ms: u64) -> AdmissionConfig {
    AdmissionConfig {
        max_wait: Duration::from_millis(max_wait_ms),
        max_first_token_wait: Duration::from_millis(max_wait_ms),
        max_generations: 64,
        kv_cache_bytes: 1 << 30,
        kv_bytes_per_token: 1000,
        prefill_slice: Duration::from_millis(250),
        max_batch_tokens: 4096,
    }
}

/// 1,000 prefill tokens per second, a step of n sequences 10 + n ms.
fn measured(a: &Admission) {
    a.calibrate_prefill(&[(1000, Duration::from_secs(1))]);
    for n in [1usize, 16] {
        a.record_step(n, Duration::from_millis(10 + n as u64));
    }
}

fn heads(tokens: u64) -> Load {
    Load {
        head_tokens: tokens,
        ..Load::default()
    }
}

fn generation(prompt: u64, new: u64) -> Load {
    Load {
        prompt_tokens: prompt,
        generations: 1,
        longest: prompt + new,
        ..Load::default()
    }
}

#[test]
fn head_work_is_admitted_within_the_budget_and_refused_beyond_it() {
    let a = Admission::new(config(1000));
    measured(&a);
    let first = a.admit(heads(600)).unwrap();
    let second = a.admit(heads(400)).unwrap();
    let refused = a.admit(heads(1)).unwrap_err();
    assert!((refused.estimated_wait.as_secs_f64() - 1.001).abs() < 0.01);
    drop(first);
    assert_eq!(a.queued().head_tokens, 400);
    let third = a.admit(heads(600)).unwrap();
    drop((second, third));
    assert_eq!(a.queued(), Load::default());
}

#[test]
fn an_idle_engine_takes_any_single_request() {
    let a = Admission::new(config(1));
    let big = a.admit(heads(1_000_000)).unwrap();
    assert!(a.admit(heads(1)).is_err());
    drop(big);
    assert!(a.admit(generation(5000, 500)).is_ok());
}

#[test]
fn a_step_of_many_sequences_is_not_many_steps_of_one() {
    let a = Admission::new(config(1000));
    measured(&a);
    // Measured at 1 and 16; between them on the line, beyond along it.
    assert!((a.step_seconds(8) - 0.018).abs() < 1e-9);
    assert!((a.step_seconds(64) - 0.074).abs() < 1e-9);
    // A size measured is taken as measured; later measurements move it.
    a.record_step(8, Duration::from_millis(28));
    assert!((a.step_seconds(8) - 0.028).abs() < 1e-9);
    a.record_step(8, Duration::from_millis(18));
    assert!((a.step_seconds(8) - 0.026).abs() < 1e-9);
}

#[test]
fn concurrent_generations_are_admitted_while_their_first_tokens_come_in_time() {
    // 16 generations of 20-token prompts and 64 new tokens each: 320 prompt tokens and
    // a decoding step after each 250-token slice come to well under a second.
    let a = Admission::new(config(1000));
    measured(&a);
    let tickets: Vec<Ticket> = (0..16)
        .map(|_| a.admit(generation(20, 64)).unwrap())
        .collect();
    assert_eq!(a.queued().generations, 16);
    // Counted as serial work at the prefill pace (the old model), 16 x 84 tokens would
    // have been 1.3 s.
    drop(tickets);
    // Prompts admitted beyond the budget are refused, with their first token's wait.
    let long = a.admit(generation(900, 64)).unwrap();
    let refused = a.admit(generation(200, 64)).unwrap_err();
    assert!(
        refused.estimated_wait > Duration::from_millis(1000),
        "{refused:?}"
    );
    assert_eq!(refused.reason, "generations queued");
    drop(long);
}

#[test]
fn a_head_request_is_admitted_behind_a_long_prefill_and_decoding() {
    // One request of 8 generations of 1,000-token prompts: 8 s of prefill. A head
    // request waits for the heads ahead of it and at most one slice and one step of
    // the generations, not for all of it.
    let a = Admission::new(config(1000));
    measured(&a);
    let big = a
        .admit(Load {
            prompt_tokens: 8000,
            generations: 8,
            longest: 2000,
            ..Load::default()
        })
        .unwrap();
    a.observe_decoding(vec![900; 8]);
    let ahead = a.admit(heads(500)).unwrap();
    let head = a.admit(heads(20));
    assert!(head.is_ok(), "{head:?}");
    // Counting the queued prompts, it would have waited 8.5 s.
    assert!(a.admit(heads(300)).is_err(), "the heads ahead still count");
    drop((big, ahead, head));
}

#[test]
fn generations_past_the_slots_wait_for_one_to_end_within_the_budget_or_are_refused() {
    let a = Admission::new(AdmissionConfig {
        max_generations: 2,
        ..config(1000)
    });
    measured(&a);
    let mut decoding: Vec<Ticket> = (0..2)
        .map(|_| a.admit(generation(10, 64)).unwrap())
        .collect();
    for t in &mut decoding {
        t.prompt_done(10);
    }
    // One ends in 5 steps (~60 ms): the third waits for its slot.
    a.observe_decoding(vec![5, 60]);
    let third = a.admit(generation(10, 64)).unwrap();
    // The fourth would wait for the second to end: 60 steps of ~12 ms, under a second.
    let fourth = a.admit(generation(10, 64)).unwrap();
    // The fifth has no slot in sight: refused, with the soonest end as its wait.
    let refused = a.admit(generation(10, 64)).unwrap_err();
    assert_eq!(refused.reason, "every decoding slot is taken");
    drop((third, fourth));
    // Both decode for another 100 steps: the third's slot is beyond the budget.
    a.observe_decoding(vec![100, 100]);
    assert!(a.admit(generation(10, 64)).is_err());
    drop(decoding);
}

#[test]
fn generations_beyond_the_cache_memory_are_refused() {
    // Room for 4 slots of 128 positions at 1,000 bytes each.
    let a = Admission::new(AdmissionConfig {
        kv_cache_bytes: 4 * 128 * 1000,
        ..config(10_000)
    });
    measured(&a);
    let short = a.admit(generation(10, 100)).unwrap();
    let refused = a.admit(generation(10, 500)).unwrap_err();
    assert_eq!(refused.reason, "the decoding cache is full");
    let others: Vec<Ticket> = (0..3)
        .map(|_| a.admit(generation(10, 100)).unwrap())
        .collect();
    assert!(
        a.admit(generation(10, 100)).is_err(),
        "a fifth needs 8 slots"
    );
    drop((short, others));
}

#[test]
fn the_engine_releases_a_tickets_parts_as_they_are_done() {
    let a = Admission::new(config(1000));
    measured(&a);
    let mut t = a
        .admit(Load {
            head_tokens: 30,
            prompt_tokens: 50,
            generations: 2,
            longest: 90,
        })
        .unwrap();
    t.heads_done();
    t.prompt_done(20);
    assert_eq!(
        a.queued(),
        Load {
            head_tokens: 0,
            prompt_tokens: 30,
            generations: 2,
            longest: 90
        }
    );
    drop(t);
    assert_eq!(a.queued(), Load::default());
}

#[test]
fn requests_in_preparation_count_at_the_typical_load_of_their_kind() {
    let a = Admission::new(config(1000));
    measured(&a);
    // Before any request was measured, a sequence is estimated at one head token.
    let first = a.reserve("QED", 2).unwrap();
    assert_eq!(a.queued().head_tokens, 2);
    let first = a.settle(first, heads(200), 2).unwrap();
    assert_eq!(a.queued().head_tokens, 200, "settled at its measured size");
    // Now a sequence is typically 100 tokens: requests being prepared count as such,
    // and the next past the budget is refused before it is prepared.
    let preparing: Vec<Ticket> = (0..7).map(|_| a.reserve("QED", 1).unwrap()).collect();
    assert_eq!(a.queued().head_tokens, 900);
    assert_eq!(a.preparing(), 7, "reserved, not yet settled");
    assert!(a.reserve("QED", 2).is_err());
    drop((first, preparing));
    assert_eq!(a.queued(), Load::default(), "released when dropped");
    assert_eq!(a.preparing(), 0);
    // A generation kind is estimated as a generation.
    let g = a.reserve("Translate", 1).unwrap();
    drop(a.settle(g, generation(30, 64), 1).unwrap());
    let g = a.reserve("Translate", 2).unwrap();
    assert_eq!(a.queued().generations, 2);
    assert_eq!(a.queued().prompt_tokens, 60);
    // A kind not seen yet counts as head work, even when generations were the last
    // seen: it is not refused on their first-token wait before it is known to be one.
    let unseen = a.reserve("BA", 1).unwrap();
    assert_eq!(a.queued().generations, 2);
    assert!(a.queued().head_tokens > 0);
    drop((g, unseen));
}

#[test]
fn a_reserved_request_keeps_its_place_within_twice_its_estimate() {
    let a = Admission::new(config(1000));
    measured(&a);
    let m = a.reserve("QED", 1).unwrap();
    let m = a.settle(m, heads(100), 1).unwrap();
    let (early, late) = (a.reserve("QED", 1).unwrap(), a.reserve("QED", 1).unwrap());
    let others: Vec<Ticket> = (0..6).map(|_| a.reserve("QED", 1).unwrap()).collect();
    assert_eq!(a.queued().head_tokens, 900, "the queue is nearly full");
    // 150 tokens against an estimate of 100: kept, though the queue filled meanwhile.
    let early = a.settle(early, heads(150), 1).unwrap();
    assert_eq!(a.queued().head_tokens, 950);
    // 250 against 100 must fit as a new request would: it does not.
    assert!(a.settle(late, heads(250), 1).is_err());
    assert_eq!(
        a.queued().head_tokens,
        850,
        "a refused settlement is released"
    );
    drop((m, early, others));
    assert_eq!(a.queued(), Load::default());
}

#[test]
fn a_batch_of_small_requests_costs_one_forward_not_one_each() {
    // Measured: 16 tokens in 0.13 s, 256 in 0.55 s: 0.102 s per forward, 571 tokens/s.
    let a = Admission::new(config(1000));
    a.calibrate_prefill(&[
        (16, Duration::from_millis(130)),
        (256, Duration::from_millis(550)),
    ]);
    assert!((a.prefill_fixed_seconds() - 0.102).abs() < 1e-3);
    assert!((a.pace() - 571.4).abs() < 1.0, "{}", a.pace());
    // Eight 60-token requests fit one second together (one forward: 0.94 s), though
    // each alone takes 0.2 s: one at a time, five would.
    let admitted: Vec<Ticket> = (0..8).map(|_| a.admit(heads(60)).unwrap()).collect();
    assert!(a.admit(heads(60)).is_err());
    // Further measurements move the line.
    for _ in 0..200 {
        a.record_prefill(16, Duration::from_millis(30));
        a.record_prefill(256, Duration::from_millis(450));
    }
    assert!((a.prefill_fixed_seconds() - 0.002).abs() < 1e-3);
    drop(admitted);
}

#[test]
fn the_prefill_slice_follows_the_pace() {
    let a = Admission::new(config(1000));
    a.calibrate_prefill(&[(1000, Duration::from_secs(1))]);
    assert_eq!(a.prefill_budget(), 250);
    // Slices deep into a long prompt ran at 400 tokens/s: the next ones are smaller.
    a.record_slice(250, Duration::from_millis(625));
    assert_eq!(a.prefill_budget(), 100);
    let a = Admission::new(config(1000));
    a.calibrate_prefill(&[(10, Duration::from_secs(1))]);
    assert_eq!(a.prefill_budget(), MIN_PREFILL_BUDGET);
}
