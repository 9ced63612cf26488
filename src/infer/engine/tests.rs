use candle_core::quantized::GgmlDType;
use candle_core::Device;

use super::*;
use crate::infer::admission::Load;
use crate::infer::{EngineMetrics, Prediction};
use crate::tags::compose::Composed;

/// An engine on the tiny model, driven one iteration at a time: every slice takes the
/// 32-token minimum, and admission lets everything in.
struct Harness {
    _dir: tempfile::TempDir,
    model: BaseModel,
    cfg: EngineConfig,
    admission: Admission,
    metrics: EngineMetrics,
    fault: AtomicBool,
    tx: mpsc::UnboundedSender<Work>,
    queue: Queue,
    flights: Flights,
    generations: Generations,
}

impl Harness {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        crate::model::tiny::write_tiny_gguf(&path, GgmlDType::Q8_0, 42, true).unwrap();
        let model = BaseModel::load(&path, &Device::Cpu).unwrap();
        // A zero slice: each iteration prefills the smallest budget, 32 tokens.
        let cfg = EngineConfig {
            prefill_slice: Duration::ZERO,
            ..Default::default()
        };
        let admission = Admission::new(AdmissionConfig {
            max_wait: Duration::from_secs(3600),
            max_first_token_wait: Duration::from_secs(3600),
            max_generations: 64,
            kv_cache_bytes: 1 << 30,
            kv_bytes_per_token: 1,
            prefill_slice: cfg.prefill_slice,
            max_batch_tokens: cfg.max_batch_tokens,
        });
        assert_eq!(admission.prefill_budget(), 32);
        let (tx, rx) = mpsc::unbounded_channel();
        let generations = Generations::new(&model, 0);
        Self {
            _dir: dir,
            model,
            cfg,
            admission,
            metrics: EngineMetrics::new(&prometheus::Registry::new()).unwrap(),
            fault: AtomicBool::new(false),
            tx,
            queue: Queue::new(rx),
            flights: Flights::default(),
            generations,
        }
    }

    /// Queues one sequence (a generation of up to 3 tokens, or a head request) and
    /// returns where its answer comes.
    fn send(&self, seq: Composed) -> oneshot::Receiver<Reply> {
        let (reply, rx) = oneshot::channel();
        let groups = vec![Group { seqs: vec![seq] }];
        let params = GenerationParams {
            max_new_tokens: 3,
            ..Default::default()
        };
        let load = work_load(&groups, &params);
        let now = Instant::now();
        self.tx
            .send(Work {
                groups,
                params,
                reply,
                stream: None,
                enqueued: now,
                deadline: now + Duration::from_secs(3600),
                ticket: self.admission.admit(load).unwrap(),
            })
            .map_err(|_| ())
            .unwrap();
        rx
    }

    /// A one-input head request of 12 tokens.
    fn send_head(&self) -> oneshot::Receiver<Reply> {
        let d = self.model.config().hidden_size;
        self.send(Composed::of_head_tokens(&[7; 12], d))
    }

    fn run_once(&mut self) -> bool {
        let mut engine = Iteration {
            model: &self.model,
            cfg: &self.cfg,
            metrics: &self.metrics,
            pace: &self.admission,
            fault: &self.fault,
        };
        engine.run_once(&mut self.queue, &mut self.flights, &mut self.generations)
    }
}

/// A long prompt is prefilled in slices of the 32-token minimum, one per iteration,
/// and a head request that comes in meanwhile is answered in the next iteration, while
/// the prompt is still part-way: it never waits for all of someone else's prefill.
#[test]
fn a_head_request_is_answered_between_two_chunks_of_a_long_prompt() {
    let mut engine = Harness::new();
    let prompt: Vec<u32> = (0..300).map(|i| 3 + i % 50).collect();
    let mut generation = engine.send(Composed::of_tokens(&prompt));
    assert!(engine.run_once());
    assert_eq!(
        engine.generations.decoding(),
        0,
        "the prompt is part-way, not decoding"
    );
    assert_eq!(
        engine.admission.queued().prompt_tokens,
        300,
        "released once prefilled"
    );

    let mut head = engine.send_head();
    assert!(engine.run_once());
    let (predictions, _) = head.try_recv().expect("answered").unwrap();
    assert!(matches!(predictions[0][0], Prediction::Value { .. }));
    assert!(generation.try_recv().is_err(), "the generation is not done");
    assert_eq!(
        engine.generations.decoding(),
        0,
        "its prompt is still part-way"
    );

    // The rest of the prompt, a slice an iteration, then its tokens.
    let mut iterations = 2;
    let answer = loop {
        match generation.try_recv() {
            Ok(answer) => break answer,
            Err(oneshot::error::TryRecvError::Empty) => {}
            Err(e) => panic!("{e}"),
        }
        assert!(iterations < 100, "the generation never finished");
        assert!(engine.run_once());
        iterations += 1;
    };
    assert!(iterations >= 300 / 32, "{iterations} iterations");
    let (predictions, _) = answer.unwrap();
    assert!(matches!(&predictions[0][0], Prediction::Text { ids, .. } if !ids.is_empty()));
    assert_eq!(
        engine.admission.queued(),
        Load::default(),
        "every ticket released"
    );
}

/// Head requests are answered as soon as their forward is done, before the iteration's
/// slice of prefill and its decoding step: a fault in that step (injected here) fails the
/// generations in flight, never a head request computed before it.
#[test]
fn a_head_request_is_answered_before_the_iterations_generation_work() {
    let mut engine = Harness::new();
    let mut generation = engine.send(Composed::of_tokens(&[5, 6, 7, 8]));
    assert!(engine.run_once());
    assert_eq!(engine.generations.decoding(), 1, "the generation decodes");

    let mut head = engine.send_head();
    engine.fault.store(true, Ordering::SeqCst);
    let iteration = catch_unwind(AssertUnwindSafe(|| engine.run_once()));
    assert!(iteration.is_err(), "the injected fault fired in the step");
    let (predictions, _) = head.try_recv().expect("answered before the step").unwrap();
    assert!(matches!(predictions[0][0], Prediction::Value { .. }));
    assert!(
        matches!(
            generation.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        ),
        "the generation is still in flight"
    );
}
