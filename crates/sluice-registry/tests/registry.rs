//! The registry contract, run on both implementations: SQLite in a temp dir, and PostgreSQL on
//! the test run's server (`SLUICE_TEST_POSTGRES`, database `test`) in a schema of its own, dropped at
//! the end.

use sluice_registry::testing::Schema;
use sluice_registry::{
    KeyScope, PostgresRegistry, RateLimit, Registry, RegistryError, SqliteRegistry, bootstrap,
};

/// What every registry must do.
async fn contract(reg: &dyn Registry) {
    // First start: org `default` and its key, once.
    let key = bootstrap(reg)
        .await
        .expect("bootstrap")
        .expect("a key on first start");
    let org = reg.org_for_key(&key).await.expect("lookup").expect("known");
    assert_eq!(org.name, "default");
    assert!(org.active);
    assert!(bootstrap(reg).await.expect("again").is_none(), "only once");

    // Keys belong to exactly one org.
    reg.create_org("acme").await.expect("create");
    reg.create_org("globex").await.expect("create");
    let acme = reg.create_key("acme").await.expect("key");
    let globex = reg.create_key("globex").await.expect("key");
    let name = |o: Option<sluice_registry::Org>| o.map(|o| o.name);
    assert_eq!(
        name(reg.org_for_key(&acme).await.expect("lookup")),
        Some("acme".into())
    );
    assert_eq!(
        name(reg.org_for_key(&globex).await.expect("lookup")),
        Some("globex".into())
    );
    assert_eq!(reg.org_for_key("sk_nope").await.expect("lookup"), None);

    // Scoped keys: listed (never the key), found with their scope, revoked by id.
    let writer = reg
        .create_scoped_key("acme", KeyScope::Write)
        .await
        .expect("key");
    let reader = reg
        .create_scoped_key("acme", KeyScope::Read)
        .await
        .expect("key");
    let owner = |key: String| async move {
        reg.key_owner(&key)
            .await
            .expect("lookup")
            .map(|(org, scope)| (org.name, scope))
    };
    assert_eq!(
        owner(acme.clone()).await,
        Some(("acme".into(), KeyScope::Full))
    );
    assert_eq!(
        owner(writer.clone()).await,
        Some(("acme".into(), KeyScope::Write))
    );
    assert_eq!(
        owner(reader.clone()).await,
        Some(("acme".into(), KeyScope::Read))
    );
    // Oldest first; keys made within one second in no particular order: sorted here.
    let mut listed = reg.list_keys("acme").await.expect("list");
    listed.sort_by_key(|k| k.scope.as_str());
    assert_eq!(
        listed.iter().map(|k| k.scope).collect::<Vec<_>>(),
        [KeyScope::Full, KeyScope::Read, KeyScope::Write]
    );
    let listed = [listed[0].clone(), listed[2].clone(), listed[1].clone()];
    for (info, key) in listed.iter().zip([&acme, &writer, &reader]) {
        assert_eq!(info.id, sluice_registry::hash_key(key)[..12]);
        assert!(key.starts_with(&info.prefix), "{info:?}");
        assert!(
            !format!("{info:?}").contains(&key[10..]),
            "the key is never shown"
        );
    }
    for bad in ["abc", "0123456789abcdefg", "%%%%%%%%", "________"] {
        assert!(
            matches!(reg.revoke_key(bad).await, Err(RegistryError::NoSuchKey(_))),
            "{bad}"
        );
    }
    let revoked = reg.revoke_key(&listed[1].id[..8]).await.expect("revoke");
    assert_eq!(revoked, ("acme".to_string(), listed[1].clone()));
    assert!(matches!(
        reg.revoke_key(&listed[1].id).await,
        Err(RegistryError::NoSuchKey(_))
    ));
    assert_eq!(
        owner(writer.clone()).await,
        None,
        "a revoked key is unknown"
    );
    assert_eq!(reg.list_keys("acme").await.expect("list").len(), 2);
    assert_eq!(
        owner(reader.clone()).await,
        Some(("acme".into(), KeyScope::Read))
    );

    // Rate limits: none by default, set, seen through keys, cleared.
    assert_eq!(
        reg.org("acme").await.expect("org").expect("exists").limit,
        None
    );
    let limit = RateLimit {
        per_second: 500,
        burst: 2000,
    };
    reg.set_org_limit("acme", Some(limit)).await.expect("set");
    assert_eq!(
        reg.org("acme").await.expect("org").expect("exists").limit,
        Some(limit)
    );
    let (org, _) = reg.key_owner(&acme).await.expect("lookup").expect("known");
    assert_eq!(org.limit, Some(limit));
    reg.set_org_limit("acme", None).await.expect("clear");
    assert_eq!(
        reg.org("acme").await.expect("org").expect("exists").limit,
        None
    );
    assert!(matches!(
        reg.set_org_limit("nope", Some(limit)).await,
        Err(RegistryError::NoSuchOrg(_))
    ));

    // Org lifecycle and its errors.
    assert!(matches!(
        reg.create_org("acme").await,
        Err(RegistryError::OrgExists(_))
    ));
    assert!(matches!(
        reg.create_org("a:b").await,
        Err(RegistryError::InvalidOrgName { .. })
    ));
    assert!(matches!(
        reg.create_key("nope").await,
        Err(RegistryError::NoSuchOrg(_))
    ));
    reg.set_org_active("acme", false).await.expect("disable");
    let acme_org = reg.org("acme").await.expect("org").expect("exists");
    assert!(!acme_org.active);
    assert!(
        !reg.org_for_key(&acme)
            .await
            .expect("lookup")
            .expect("known")
            .active
    );
    assert!(matches!(
        reg.set_org_active("nope", false).await,
        Err(RegistryError::NoSuchOrg(_))
    ));
    // The SendGrid key travels with the org, also to the key lookup the webhook uses.
    assert_eq!(acme_org.sendgrid_key, None);
    reg.set_sendgrid_key("acme", Some("MFkw..."))
        .await
        .expect("set");
    let looked_up = reg
        .org_for_key(&acme)
        .await
        .expect("lookup")
        .expect("known");
    assert_eq!(looked_up.sendgrid_key.as_deref(), Some("MFkw..."));
    reg.set_sendgrid_key("acme", None).await.expect("clear");
    assert_eq!(
        reg.org("acme")
            .await
            .expect("org")
            .expect("exists")
            .sendgrid_key,
        None
    );
    assert!(matches!(
        reg.set_sendgrid_key("nope", Some("k")).await,
        Err(RegistryError::NoSuchOrg(_))
    ));
    let names: Vec<String> = reg
        .list_orgs()
        .await
        .expect("list")
        .into_iter()
        .map(|o| o.name)
        .collect();
    assert_eq!(names, ["acme", "default", "globex"]);

    // Bans are per org.
    let globex_org = reg.org("globex").await.expect("org").expect("exists");
    reg.ban_user("acme", "u1").await.expect("ban");
    reg.ban_user("acme", "u1")
        .await
        .expect("banning twice is fine");
    assert!(matches!(
        reg.ban_user("acme", "").await,
        Err(RegistryError::InvalidUserId(_))
    ));
    assert!(reg.is_banned(acme_org.id, "u1").await.expect("check"));
    assert!(!reg.is_banned(globex_org.id, "u1").await.expect("check"));
    assert_eq!(reg.banned_users(acme_org.id).await.expect("list"), ["u1"]);
    assert!(
        reg.banned_users(globex_org.id)
            .await
            .expect("list")
            .is_empty()
    );
    assert!(reg.unban_user("acme", "u1").await.expect("unban"));
    assert!(!reg.unban_user("acme", "u1").await.expect("unban"));
    assert!(!reg.is_banned(acme_org.id, "u1").await.expect("check"));
}

#[tokio::test]
async fn sqlite_meets_the_contract() {
    let dir = tempfile::tempdir().expect("tempdir");
    let reg = SqliteRegistry::open(&dir.path().join("registry.db"))
        .await
        .expect("open");
    contract(&reg).await;
}

#[tokio::test]
async fn postgres_meets_the_contract_and_nodes_share_it() {
    let schema = Schema::create();
    let reg = PostgresRegistry::connect(&schema.url())
        .await
        .expect("connect");
    contract(&reg).await;
    // A second node (another connection pool) sees what the first wrote; migrations are
    // applied once.
    let other = PostgresRegistry::connect(&schema.url())
        .await
        .expect("connect again");
    other.create_org("late").await.expect("create");
    let key = other.create_key("late").await.expect("key");
    assert_eq!(
        reg.org_for_key(&key).await.expect("lookup").map(|o| o.name),
        Some("late".into())
    );
}

#[tokio::test]
async fn an_unreachable_postgres_is_a_clear_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let url = format!("postgres://postgres:hunter2@127.0.0.1:{port}/test");
    let error = match PostgresRegistry::connect(&url).await {
        Ok(_) => panic!("connected to a port where nothing listens"),
        Err(e) => e.to_string(),
    };
    assert!(error.contains(&format!("127.0.0.1:{port}")), "{error}");
    assert!(
        !error.contains("hunter2"),
        "no password in messages: {error}"
    );
}
