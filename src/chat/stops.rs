//! Stop sequences (the OpenAI API's `stop`), applied to every provider alike: the answer ends just
//! before the first of them, which is never sent. Text that could be the start of one is held
//! back until the next piece shows whether it is, so a stop split across two tokens still stops
//! the answer and nothing of it reaches a listener. Ending the stream drops the provider's
//! connection, which stops its generation (and its bill).

use futures_util::StreamExt;
use futures_util::stream;

use crate::providers::{ProviderEvent, ProviderStream};

struct Cutting {
    upstream: Option<ProviderStream>,
    stops: Vec<String>,
    held: String,
}

/// `upstream`, ended before the first of `stops`; unchanged when there are none.
pub(super) fn cut_at_stops(upstream: ProviderStream, stops: &[String]) -> ProviderStream {
    let stops: Vec<String> = stops.iter().filter(|s| !s.is_empty()).cloned().collect();
    if stops.is_empty() {
        return upstream;
    }
    let state = Cutting {
        upstream: Some(upstream),
        stops,
        held: String::new(),
    };
    stream::unfold(state, |mut state| async move {
        loop {
            let upstream = state.upstream.as_mut()?;
            match upstream.next().await {
                Some(Ok(ProviderEvent::TextDelta(text))) => {
                    state.held.push_str(&text);
                    if let Some(at) = first_stop(&state.held, &state.stops) {
                        state.upstream = None;
                        state.held.truncate(at);
                        let text = std::mem::take(&mut state.held);
                        if !text.is_empty() {
                            return Some((Ok(ProviderEvent::TextDelta(text)), state));
                        }
                        return None;
                    }
                    let keep = held_back(&state.held, &state.stops);
                    let text: String = state.held.drain(..state.held.len() - keep).collect();
                    if !text.is_empty() {
                        return Some((Ok(ProviderEvent::TextDelta(text)), state));
                    }
                }
                None => {
                    state.upstream = None;
                    let text = std::mem::take(&mut state.held);
                    if !text.is_empty() {
                        return Some((Ok(ProviderEvent::TextDelta(text)), state));
                    }
                    return None;
                }
                other => return other.map(|item| (item, state)),
            }
        }
    })
    .boxed()
}

/// Where the earliest stop sequence starts in `text`.
fn first_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops
        .iter()
        .filter_map(|stop| text.find(stop.as_str()))
        .min()
}

/// Bytes at the end of `text` that begin some stop sequence (and so cannot be sent yet).
fn held_back(text: &str, stops: &[String]) -> usize {
    let longest = stops.iter().map(|s| s.len()).max().unwrap_or(0);
    let from = text.len().saturating_sub(longest.saturating_sub(1));
    (from..text.len())
        .filter(|&at| text.is_char_boundary(at))
        .find(|&at| stops.iter().any(|stop| stop.starts_with(&text[at..])))
        .map_or(0, |at| text.len() - at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::ProviderError;

    async fn cut(pieces: &[&str], stops: &[&str]) -> Vec<String> {
        let items: Vec<Result<ProviderEvent, ProviderError>> = pieces
            .iter()
            .map(|p| Ok(ProviderEvent::TextDelta((*p).to_owned())))
            .collect();
        let stops: Vec<String> = stops.iter().map(|s| (*s).to_owned()).collect();
        cut_at_stops(stream::iter(items).boxed(), &stops)
            .map(|item| match item {
                Ok(ProviderEvent::TextDelta(text)) => text,
                other => panic!("unexpected {other:?}"),
            })
            .collect()
            .await
    }

    #[tokio::test]
    async fn an_answer_ends_before_its_first_stop_sequence() {
        assert_eq!(
            cut(&["one two", " END three"], &["END"]).await,
            ["one two", " "]
        );
        assert_eq!(cut(&["ab", "c"], &["zz", "bc"]).await, ["a"]);
        assert_eq!(cut(&["STOP now"], &["STOP"]).await, Vec::<String>::new());
    }

    #[tokio::test]
    async fn a_stop_split_across_pieces_is_held_back_then_cut() {
        assert_eq!(cut(&["hello E", "N", "D more"], &["END"]).await, ["hello "]);
    }

    #[tokio::test]
    async fn held_back_text_that_is_no_stop_goes_out_with_the_next_piece() {
        assert_eq!(cut(&["a E", "x", "b"], &["END"]).await, ["a ", "Ex", "b"]);
        assert_eq!(cut(&["tail E"], &["END"]).await, ["tail ", "E"]);
    }

    #[tokio::test]
    async fn text_passes_unchanged_without_stops_and_multibyte_text_is_never_split() {
        assert_eq!(cut(&["a", "b"], &[]).await, ["a", "b"]);
        assert_eq!(cut(&["é", "éa"], &["éb"]).await, ["ééa"]);
    }
}
