//! Streamed generations: server-sent events that add up to the answer.

use crate::common::server::{start, Options};
use reqwest::StatusCode;
use serde_json::json;

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_streams_its_text_as_server_sent_events() {
    let s = start(Options::default()).await;
    install_chem(&s).await;
    for (name, parameters) in [
        ("greedy", json!({"max_new_tokens": 24})),
        // Pieces never run past a stop string that cuts the text later: the tiny model
        // says "onon..onxx..", so "n" must be held back until "x" shows it is a stop.
        ("stop", json!({"max_new_tokens": 24, "stop": ["nx"]})),
    ] {
        let body = json!({"template": "<SMILES> {x}", "inputs": ["the cat sat on"], "parameters": parameters});
        let (status, whole) = post(&s.url, "/predict", body.clone()).await;
        assert_eq!(status, StatusCode::OK, "{whole}");
        let finish = if name == "stop" { "stop" } else { "length" };
        assert_eq!(whole["predictions"][0]["finish_reason"], finish, "{whole}");
        let resp = predict_streamed(&s.url, &body).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        let events = sse_events(resp).await;
        let (last, tokens) = events.split_last().unwrap();
        assert_eq!(last.0, "done", "{name}: {events:?}");
        assert_eq!(
            last.1, whole,
            "{name}: the done event is the unstreamed answer"
        );
        assert!(
            tokens.iter().all(|(e, _)| e == "token"),
            "{name}: {events:?}"
        );
        let text: String = tokens
            .iter()
            .map(|(_, d)| d["text"].as_str().unwrap())
            .collect();
        assert_eq!(
            text, whole["predictions"][0]["text"],
            "{name}: the pieces add up to the text"
        );
        assert!(tokens.len() >= 2 || name == "stop", "{name}: {events:?}");
    }
    // Only a single generation streams; the rest is refused before any event.
    for (body, mentions) in [
        (
            json!({"function": "QED", "inputs": ["CCO"], "stream": true}),
            "no head",
        ),
        (
            json!({"template": "{x}", "inputs": ["a", "b"], "stream": true}),
            "one input",
        ),
    ] {
        assert_invalid_predict(&s.url, body, mentions).await;
    }
}
