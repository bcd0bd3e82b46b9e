//! `POST /api/search/*` on the cluster: the query string as a `query_string` query over the
//! same default fields as the embedded index, inside a filter on the org; aggregations are
//! passed through, with one translation: a `field` naming a string of `dataFields` (mapped as
//! tokenized `text`) is pointed at its `.raw` keyword, which is what the embedded index
//! aggregates on.

use reqwest::Method;
use serde_json::{Value, json};

use super::{ElasticIndex, Total};
use crate::{IndexError, SearchRequest, SearchResponse, Target};

/// What a bare word searches, as in the embedded schemas.
fn default_fields(target: Target) -> &'static [&'static str] {
    match target {
        Target::Users => &["userId", "email", "dataFields.*"],
        Target::Events => &["eventName", "userId", "email", "dataFields.*"],
    }
}

pub(super) async fn search(
    index: &ElasticIndex,
    org: &str,
    target: Target,
    request: &SearchRequest,
) -> Result<SearchResponse, IndexError> {
    let query = if request.query.trim().is_empty() {
        json!({"match_all": {}})
    } else {
        json!({"query_string": {
            "query": request.query,
            "fields": default_fields(target),
            // A bare word also reaches numeric and date fields of dataFields: not an error.
            "lenient": true,
        }})
    };
    let mut body = json!({
        "size": request.size,
        "track_total_hits": true,
        "_source": {"excludes": ["sluice"]},
        "query": {"bool": {
            "filter": [{"term": {"sluice.org": org}}],
            "must": [query],
        }},
    });
    if let Some(aggs) = &request.aggs {
        if !aggs.is_object() {
            return Err(IndexError::BadRequest(
                "aggs: expected an object of named aggregations".into(),
            ));
        }
        let mut aggs = aggs.clone();
        raw_keywords(index, target, &mut aggs).await?;
        body["aggs"] = aggs;
    }
    let answer = index.search_raw(target, &body).await?;
    let total = match answer.hits.total {
        Some(Total::Object { value } | Total::Number(value)) => value,
        None => answer.hits.hits.len() as u64,
    };
    Ok(SearchResponse {
        total,
        hits: answer
            .hits
            .hits
            .into_iter()
            .map(|hit| super::without_internal(hit.source))
            .collect(),
        aggregations: answer.aggregations,
    })
}

/// Points every aggregation `field` naming a text field of `dataFields` at its `.raw` keyword.
async fn raw_keywords(
    index: &ElasticIndex,
    target: Target,
    aggs: &mut Value,
) -> Result<(), IndexError> {
    let mut names = Vec::new();
    visit_fields(aggs, &mut |name: &mut String| {
        if !names.contains(name) {
            names.push(name.clone());
        }
    });
    if names.is_empty() {
        return Ok(());
    }
    let text = text_fields(index, target, &names).await?;
    visit_fields(aggs, &mut |name: &mut String| {
        if text.contains(name) {
            name.push_str(".raw");
        }
    });
    Ok(())
}

/// Calls `f` on every `"field": "dataFields.…"` string of an aggregation tree.
fn visit_fields(value: &mut Value, f: &mut impl FnMut(&mut String)) {
    match value {
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                match v {
                    Value::String(name)
                        if key == "field"
                            && name.starts_with("dataFields.")
                            && !name.ends_with(".raw") =>
                    {
                        f(name)
                    }
                    other => visit_fields(other, f),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| visit_fields(v, f)),
        _ => {}
    }
}

/// Which of `names` are text fields, from the mapping (cached: a field's type never changes
/// once mapped; a field not mapped yet is asked again next time).
async fn text_fields(
    index: &ElasticIndex,
    target: Target,
    names: &[String],
) -> Result<Vec<String>, IndexError> {
    let mut text = Vec::new();
    let mut unknown = Vec::new();
    {
        let cache = index.text_fields.lock().map_err(|_| IndexError::Closed)?;
        for name in names {
            match cache.get(&(target, name.clone())) {
                Some(true) => text.push(name.clone()),
                Some(false) => {}
                None => unknown.push(name.as_str()),
            }
        }
    }
    if unknown.is_empty() {
        return Ok(text);
    }
    let index_name = index.index_name(target);
    let fields = unknown.join(",");
    let (status, answer) = index
        .request(
            Method::GET,
            &[index_name, "_mapping", "field", &fields],
            None,
        )
        .await?;
    if !status.is_success() {
        return Err(index.rejected(
            &format!("GET /{index_name}/_mapping/field/{fields}"),
            status,
            &answer,
        ));
    }
    let answer: Value = serde_json::from_slice(&answer).map_err(|e| {
        index.unavailable(format!(
            "GET /{index_name}/_mapping/field: unexpected answer: {e}"
        ))
    })?;
    let mut cache = index.text_fields.lock().map_err(|_| IndexError::Closed)?;
    if cache.len() > 10_000 {
        cache.clear();
    }
    for name in unknown {
        // {"<index>": {"mappings": {"<full name>": {"mapping": {"<leaf>": {"type": ...}}}}}}
        let mapping = answer
            .as_object()
            .and_then(|indexes| indexes.values().next())
            .and_then(|i| i["mappings"][name]["mapping"].as_object())
            .and_then(|m| m.values().next());
        let Some(mapping) = mapping else { continue };
        let is_text = mapping["type"] == "text" && mapping["fields"]["raw"].is_object();
        cache.insert((target, name.to_owned()), is_text);
        if is_text {
            text.push(name.to_owned());
        }
    }
    Ok(text)
}
