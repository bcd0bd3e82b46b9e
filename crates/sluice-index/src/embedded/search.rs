//! `POST /api/search/*` on tantivy: the query string (Lucene syntax through tantivy's query
//! parser), scoped to one org, with Elasticsearch-style aggregations (tantivy's aggregation
//! module speaks the same request and result JSON).

use tantivy::TantivyError;
use tantivy::aggregation::agg_req::Aggregations;
use tantivy::aggregation::{AggContextParams, AggregationCollector, AggregationLimitsGuard};
use tantivy::collector::{Count, MultiCollector, TopDocs};
use tantivy::query::{AllQuery, BooleanQuery, Occur, Query, QueryParser};
use tantivy::query_grammar::{self, UserInputAst, UserInputLeaf};

use super::{Side, storage_error, term_query};
use crate::{IndexError, SearchRequest, SearchResponse};

pub(crate) fn search(
    side: &Side,
    org: &str,
    request: &SearchRequest,
) -> Result<SearchResponse, IndexError> {
    request.check()?;
    let query = BooleanQuery::new(vec![
        (Occur::Must, term_query(side.fields.org, org)),
        (Occur::Must, parse_query(side, &request.query)?),
    ]);
    let aggregations = match &request.aggs {
        None => None,
        Some(aggs) => Some(
            serde_json::from_value::<Aggregations>(aggs.clone())
                .map_err(|e| IndexError::BadRequest(format!("aggs: {e}")))?,
        ),
    };

    let searcher = side.reader.searcher();
    let mut collectors = MultiCollector::new();
    let count = collectors.add_collector(Count);
    let top = (request.size > 0)
        .then(|| collectors.add_collector(TopDocs::with_limit(request.size).order_by_score()));
    let aggs = aggregations.map(|aggs| {
        let context = AggContextParams::new(
            AggregationLimitsGuard::default(),
            side.index.tokenizers().clone(),
        );
        collectors.add_collector(AggregationCollector::from_aggs(aggs, context))
    });
    let mut fruits = searcher
        .search(&query, &collectors)
        .map_err(|e| execution_error(side, e))?;

    let total = count.extract(&mut fruits) as u64;
    let hits = match top {
        Some(top) => top
            .extract(&mut fruits)
            .into_iter()
            .map(|(_, address)| side.source(&searcher, address))
            .collect::<Result<Vec<_>, _>>()?,
        None => Vec::new(),
    };
    let aggregations = match aggs {
        Some(aggs) => Some(
            serde_json::to_value(aggs.extract(&mut fruits))
                .map_err(|e| storage_error(&side.path, e))?,
        ),
        None => None,
    };
    Ok(SearchResponse {
        total,
        hits,
        aggregations,
    })
}

/// The user's query; empty matches everything.
fn parse_query(side: &Side, query: &str) -> Result<Box<dyn Query>, IndexError> {
    if query.trim().is_empty() {
        return Ok(Box::new(AllQuery));
    }
    let schema = side.index.schema();
    let default_fields = side
        .fields
        .default_fields
        .iter()
        .filter_map(|name| schema.get_field(name).ok())
        .collect();
    let parser = QueryParser::for_index(&side.index, default_fields);
    let (ast, errors) = query_grammar::parse_query_lenient(query);
    if let Some(error) = errors.first() {
        return Err(IndexError::BadRequest(format!(
            "query {query:?}: syntax error at character {}: {}",
            error.pos + 1,
            error.message
        )));
    }
    parser
        .build_query_from_user_input_ast(only_negative_means_all_but(ast))
        .map_err(|e| IndexError::BadRequest(format!("query {query:?}: {e}")))
}

/// Lucene/Elasticsearch read `a AND NOT b` as "a, without b", and a lone `NOT b` as "everything
/// but b". tantivy parses them into a group holding only a negative clause, which matches
/// nothing. Give every such group an implicit "match all" to subtract from.
fn only_negative_means_all_but(ast: UserInputAst) -> UserInputAst {
    match ast {
        UserInputAst::Clause(clauses) => {
            let mut clauses: Vec<_> = clauses
                .into_iter()
                .map(|(occur, sub)| (occur, only_negative_means_all_but(sub)))
                .collect();
            if !clauses.is_empty()
                && clauses
                    .iter()
                    .all(|(occur, _)| *occur == Some(query_grammar::Occur::MustNot))
            {
                clauses.push((
                    Some(query_grammar::Occur::Must),
                    UserInputAst::Leaf(Box::new(UserInputLeaf::All)),
                ));
            }
            UserInputAst::Clause(clauses)
        }
        UserInputAst::Boost(inner, boost) => {
            UserInputAst::Boost(Box::new(only_negative_means_all_but(*inner)), boost)
        }
        leaf => leaf,
    }
}

/// Errors while running a search: a bad aggregation is the client's, the rest is storage.
fn execution_error(side: &Side, e: TantivyError) -> IndexError {
    match e {
        TantivyError::AggregationError(_)
        | TantivyError::InvalidArgument(_)
        | TantivyError::FieldNotFound(_)
        | TantivyError::SchemaError(_) => IndexError::BadRequest(format!("aggs: {e}")),
        other => storage_error(&side.path, other),
    }
}
