//! Read access to the request context.

use std::cell::OnceCell;

use serde_json::{Map, Value};

use crate::abi;

/// The request context: the `_context_*` fields of the RPC message with the prefix removed, e.g.
/// `{"user_id": "u1", "request_id": "req-…"}`.
///
/// A handler gets it by taking `&Context` (see [`Handler`](crate::Handler)). It is read from the
/// host on first use, so a handler that never looks at it pays nothing. Unknown fields are
/// normal: the host may add its own.
///
/// ```
/// use warren_guest::{Context, Error, testing};
///
/// fn whoami(ctx: &Context) -> Result<String, Error> {
///     ctx.user_id().map(str::to_owned).ok_or_else(|| Error::new("Unauthenticated", "no user"))
/// }
///
/// let out = testing::invoke(whoami, "{}", r#"{"user_id": "u1"}"#);
/// assert_eq!(out.results, ["u1"]);
/// ```
#[derive(Debug, Clone)]
pub struct Context {
    map: OnceCell<Map<String, Value>>,
}

impl Context {
    /// A context that reads the current invocation's context from the host on first use.
    pub(crate) fn from_host() -> Self {
        Self {
            map: OnceCell::new(),
        }
    }

    /// A context holding `map`, for calling a handler function directly in a test.
    ///
    /// ```
    /// use warren_guest::{Context, serde_json::{Map, json}};
    ///
    /// let mut map = Map::new();
    /// map.insert("request_id".into(), json!("req-1"));
    /// assert_eq!(Context::from_map(map).request_id(), Some("req-1"));
    /// ```
    pub fn from_map(map: Map<String, Value>) -> Self {
        Self {
            map: OnceCell::from(map),
        }
    }

    /// The whole context object. A context that is not a JSON object (the host never sends one)
    /// reads as empty rather than failing the handler.
    ///
    /// ```
    /// use warren_guest::{Context, Error, serde_json::{Map, Value}, testing};
    ///
    /// fn context(ctx: &Context) -> Result<Map<String, Value>, Error> {
    ///     Ok(ctx.as_map().clone())
    /// }
    ///
    /// let out = testing::invoke(context, "{}", r#"{"user_id": "u1", "roles": ["admin"]}"#);
    /// assert_eq!(out.results[0]["roles"][0], "admin");
    /// ```
    pub fn as_map(&self) -> &Map<String, Value> {
        self.map
            .get_or_init(|| serde_json::from_slice(&abi::context()).unwrap_or_default())
    }

    /// The value of field `key`, if present.
    ///
    /// ```
    /// use warren_guest::{Context, serde_json::{Map, json}};
    ///
    /// let ctx = Context::from_map(Map::from_iter([("is_admin".to_owned(), json!(true))]));
    /// assert_eq!(ctx.get("is_admin"), Some(&json!(true)));
    /// assert_eq!(ctx.get("missing"), None);
    /// ```
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.as_map().get(key)
    }

    /// The value of field `key` if it is a string.
    ///
    /// ```
    /// use warren_guest::{Context, serde_json::{Map, json}};
    ///
    /// let ctx = Context::from_map(Map::from_iter([
    ///     ("tenant".to_owned(), json!("t1")),
    ///     ("is_admin".to_owned(), json!(true)),
    /// ]));
    /// assert_eq!(ctx.get_str("tenant"), Some("t1"));
    /// assert_eq!(ctx.get_str("is_admin"), None);
    /// ```
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }

    /// The `request_id` field (`_context_request_id` on the wire).
    ///
    /// ```
    /// use warren_guest::{Context, serde_json::{Map, json}};
    ///
    /// let ctx = Context::from_map(Map::from_iter([("request_id".to_owned(), json!("req-7"))]));
    /// assert_eq!(ctx.request_id(), Some("req-7"));
    /// ```
    pub fn request_id(&self) -> Option<&str> {
        self.get_str("request_id")
    }

    /// The `user_id` field (`_context_user_id` on the wire).
    ///
    /// ```
    /// use warren_guest::{Context, serde_json::Map};
    ///
    /// assert_eq!(Context::from_map(Map::new()).user_id(), None);
    /// ```
    pub fn user_id(&self) -> Option<&str> {
        self.get_str("user_id")
    }

    /// The `project_id` field (`_context_project_id` on the wire).
    ///
    /// ```
    /// use warren_guest::{Context, serde_json::{Map, json}};
    ///
    /// let ctx = Context::from_map(Map::from_iter([("project_id".to_owned(), json!("p1"))]));
    /// assert_eq!(ctx.project_id(), Some("p1"));
    /// ```
    pub fn project_id(&self) -> Option<&str> {
        self.get_str("project_id")
    }
}
